"""The gRPC service end to end: real `python -m gradserve_server` processes on 127.0.0.1, driven
through the SDK (`gs.connect`) and through bare stubs, compared with the local engine.

Covers every RPC, every error code the service answers, restarts (with and without a store),
health and reflection, TLS, bearer tokens, graceful shutdown, concurrent clients, metrics and
the command line."""

from __future__ import annotations

import math
import signal
import struct
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from service_fixtures import (
    NOT_SERVING,
    SERVICE,
    SERVING,
    ServerProcess,
    channel,
    child_env,
    fill,
    health_status,
    metric,
    parse_metrics,
    rpc_error,
    scrape,
    self_signed_cert,
    stub,
    wait_until,
)

import gradserve as gs
from gradserve import remote as rm
from gradserve_engine.engine import Engine
from gradserve_engine.ir import Graph, Input, Node, tensor_from_proto
from gradserve_engine.v1 import graph_pb2
from gradserve_engine.v1 import service_pb2 as pb

LOCAL = Engine()  # the local engine the remote results are compared with
TOL = 1e-12

# ---------------------------------------------------------------- functions and graphs to work on


def mlp_loss(params, x):
    h = gs.tanh(x @ params["w"] + params["b"])
    return gs.mean(h * h) + gs.sum(gs.sin(params["b"]))


def vec(x, w):
    return gs.tanh(w @ x) * 2.0


def two(x, y):
    return {"a": x * y, "b": gs.exp(x) + y}


def quartic(x, w):
    return gs.sum(vec(x, w) ** 2) + gs.sum(x**4)


def seed_f(x, y):
    return gs.sum(gs.sin(x) * y)


def chain(n):
    def f(x, w):
        for _ in range(n):
            x = gs.tanh(gs.matmul(x, w))
        return gs.sum(x)

    f.__qualname__ = f"chain{n}"
    return f


HEAVY = chain(30)  # 30 chained 600x600 matmuls: a few hundred ms on the server
SLOW = chain(80)  # about a second: the call held in flight
rng = np.random.default_rng(2024)
PARAMS = {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal(3)}
X54 = rng.standard_normal((5, 4))
V4, W34 = rng.standard_normal(4), rng.standard_normal((3, 4))
MX = rng.standard_normal((600, 600)) * 0.01
MW = rng.standard_normal((600, 600)) * 0.01
MATRICES = {"x": MX, "w": MW}


def assert_close(actual, expected):
    actual, expected = np.asarray(actual), np.asarray(expected)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    np.testing.assert_allclose(actual, expected, rtol=TOL, atol=TOL)


def assert_tree_close(actual, expected):
    la, lb = gs.flatten(actual, "")[0], gs.flatten(expected, "")[0]
    assert [n for n, _ in la] == [n for n, _ in lb]
    for (_, a), (_, b) in zip(la, lb, strict=True):
        assert_close(a, b)


def decode(field):
    return {name: tensor_from_proto(t) for name, t in field.items()}


def _evaluate_request(gid, inputs, outputs=()):
    req = pb.EvaluateRequest(graph_id=gid, outputs=list(outputs))
    fill(req.inputs, inputs)
    return req


def _gradient_request(gid, inputs, wrt):
    req = pb.GradientRequest(graph_id=gid, wrt=list(wrt))
    fill(req.inputs, inputs)
    return req


def unique_graph():
    """A graph no other test registered (its constant is random): `created` is true once."""
    c = float(np.random.default_rng().uniform(1, 2))
    return gs.trace(lambda x: x * c + 1.0, np.zeros(3))


# ---------------------------------------------------------------- fixtures (server, remote, chan, bare: conftest.py)


@pytest.fixture(scope="module")
def slow_reference():
    """sum of the SLOW chain on MATRICES, by the local engine (computed once)."""
    return LOCAL.evaluate(gs.trace(SLOW, MX, MW), MATRICES)["out"]


# ---------------------------------------------------------------- every RPC through the SDK


def test_grad_and_value_and_grad_match_local(remote):
    assert_tree_close(remote.grad(mlp_loss, argnums=(0, 1))(PARAMS, X54), gs.grad(mlp_loss, argnums=(0, 1))(PARAMS, X54))
    assert_tree_close(remote.value_and_grad(mlp_loss)(PARAMS, X54), gs.value_and_grad(mlp_loss)(PARAMS, X54))
    aux = lambda p, x: (mlp_loss(p, x), x * 2.0)  # noqa: E731
    assert_tree_close(remote.grad(aux, has_aux=True)(PARAMS, X54), gs.grad(aux, has_aux=True)(PARAMS, X54))
    # the seed example, scalars in and out
    assert remote.grad(lambda x, y: x * y + gs.sin(x), argnums=(0, 1))(2.0, 3.0) == pytest.approx(
        (3.0 + np.cos(2.0), 2.0), abs=TOL)


def test_register_graph_is_idempotent(remote, bare):
    g = unique_graph()
    first = bare.RegisterGraph(pb.RegisterGraphRequest(graph=g.to_proto()), timeout=10)
    second = bare.RegisterGraph(pb.RegisterGraphRequest(graph=g.to_proto()), timeout=10)
    assert first.graph_id == second.graph_id == g.id
    assert (first.created, second.created) == (True, False)
    assert remote.register(g) == g.id  # the SDK agrees on the content hash
    assert bare.RegisterGraph(pb.RegisterGraphRequest(graph=g.to_proto()), timeout=10).created is False


def test_evaluate(remote, bare):
    g = gs.trace(two, V4, V4 * 2)
    inputs = {"x": V4, "y": V4 * 2}
    expected = LOCAL.evaluate(g, inputs)
    got = remote.evaluate(g, inputs)
    assert sorted(got) == sorted(expected) == ["out.a", "out.b"]
    for k in expected:
        assert_close(got[k], expected[k])
    only_b = remote.evaluate(g.id, inputs, outputs=["out.b"])
    assert list(only_b) == ["out.b"]
    assert_close(only_b["out.b"], expected["out.b"])
    resp = bare.Evaluate(_evaluate_request(g.id, inputs), timeout=10)
    assert_close(decode(resp.outputs)["out.a"], expected["out.a"])


def test_gradient_with_and_without_seeds(remote):
    g = gs.trace(seed_f, V4, V4 + 1)
    inputs = {"x": V4, "y": V4 + 1}
    r = remote.gradient(g, inputs, ["x", "y"])  # scalar output: seed 1
    outs, grads = LOCAL.vjp(g, inputs, ["x", "y"])
    assert_close(r.outputs["out"], outs["out"])
    assert_close(r.grads["x"], grads["x"])
    assert_close(r.grads["y"], grads["y"])
    assert_close(r.grads["x"], np.cos(V4) * (V4 + 1))

    gv = gs.trace(vec, V4, W34)  # vector output: needs a seed
    inputs = {"x": V4, "w": W34}
    seed = rng.standard_normal(3)
    r = remote.gradient(gv, inputs, ["x", "w"], seeds={"out": seed})
    outs, grads = LOCAL.vjp(gv, inputs, ["x", "w"], seeds={"out": seed})
    assert_close(r.outputs["out"], outs["out"])
    assert_close(r.grads["x"], grads["x"])
    assert_close(r.grads["w"], grads["w"])
    with pytest.raises(rm.RemoteInvalidArgument) as info:
        remote.gradient(gv, inputs, ["x"])
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "'out'" in str(info.value) and "seed" in str(info.value)
    with pytest.raises(rm.RemoteInvalidArgument, match="nope"):
        remote.gradient(gv, inputs, ["nope"], seeds={"out": seed})


def test_jvp(remote):
    primals, tangents = (V4, W34), (rng.standard_normal(4), rng.standard_normal((3, 4)))
    assert_tree_close(remote.jvp(vec, primals, tangents), gs.jvp(vec, primals, tangents))
    assert_tree_close(remote.jvp(two, (V4, V4), (V4, V4)), gs.jvp(two, (V4, V4), (V4, V4)))


def test_batch_gradient(remote):
    g = gs.trace(vec, V4, W34)
    items = [{"x": rng.standard_normal(4), "w": rng.standard_normal((3, 4))} for _ in range(4)]
    seeds = [{"out": rng.standard_normal(3)} for _ in items]
    results = remote.batch_gradient(g, items, ["x", "w"], seeds=seeds)
    assert len(results) == len(items)
    for r, inputs, seed in zip(results, items, seeds, strict=True):
        outs, grads = LOCAL.vjp(g, inputs, ["x", "w"], seeds=seed)
        assert_close(r.outputs["out"], outs["out"])
        assert_close(r.grads["x"], grads["x"])
        assert_close(r.grads["w"], grads["w"])
    gs_scalar = gs.trace(seed_f, V4, V4)
    unseeded = remote.batch_gradient(gs_scalar, [{"x": V4, "y": V4 * k} for k in range(3)], ["y"])
    for k, r in enumerate(unseeded):
        assert_close(r.grads["y"], np.sin(V4))
        assert_close(r.outputs["out"], LOCAL.evaluate(gs_scalar, {"x": V4, "y": V4 * k})["out"])


def test_jacobian(remote):
    assert_tree_close(remote.jacobian(vec, argnums=(0, 1))(V4, W34), gs.jacobian(vec, argnums=(0, 1))(V4, W34))
    jac = remote.jacobian(two)(V4, V4 + 1)
    assert_tree_close(jac, gs.jacobian(two)(V4, V4 + 1))
    assert jac["a"].shape == (4, 4)


def test_hessian_and_hvp(remote):
    assert_tree_close(remote.hessian(quartic, argnums=(0, 1))(V4, W34), gs.hessian(quartic, argnums=(0, 1))(V4, W34))
    h = remote.hessian(quartic)(V4, W34)
    assert_close(h, gs.hessian(quartic)(V4, W34))
    assert h.shape == (4, 4)
    np.testing.assert_allclose(h, h.T, atol=1e-10)
    vx, vw = rng.standard_normal(4), rng.standard_normal((3, 4))
    hv = remote.hvp(quartic, (V4, W34), (vx, vw))
    assert_tree_close(hv, gs.hvp(quartic, (V4, W34), (vx, vw)))
    hx, hw = remote.hvp(quartic, (V4, W34), (vx, np.zeros((3, 4))))
    np.testing.assert_allclose(hx, h @ vx, rtol=1e-10, atol=1e-12)  # consistent with the full Hessian
    assert hw.shape == (3, 4)


def test_list_and_delete_graphs(remote, bare):
    g = unique_graph()
    gid = remote.register(g)
    infos = {i.graph_id: i for i in remote.graphs()}
    assert gid in infos
    info = infos[gid]
    assert (info.input_count, info.output_count) == (len(g.inputs), len(g.outputs)) == (1, 1)
    assert info.nodes == len(g.nodes) and info.bytes == len(g.to_proto().SerializeToString(deterministic=True))
    assert remote.evaluate(g, {"x": np.ones(3)})["out"].shape == (3,)

    assert remote.delete(gid) is True
    assert gid not in {i.graph_id for i in remote.graphs()}
    err = rpc_error(bare.Evaluate, _evaluate_request(gid, {"x": np.ones(3)}), timeout=10)
    assert err.code() == grpc.StatusCode.NOT_FOUND and gid in err.details()
    assert remote.delete(gid) is False  # deleting twice is not an error
    assert bare.DeleteGraph(pb.DeleteGraphRequest(graph_id=gid), timeout=10).deleted is False


def test_residual_session_single_and_batched(remote, bare):
    out, vjp_fn = remote.vjp(vec, V4, W34)
    lout, lvjp = gs.vjp(vec, V4, W34)
    assert_close(out, lout)
    ct = rng.standard_normal(3)
    assert_tree_close(vjp_fn(ct), lvjp(ct))
    assert_tree_close(vjp_fn(ct * 2), lvjp(ct * 2))  # the session is reusable

    cts = rng.standard_normal((6, 3))  # a stacked batch of cotangents
    bx, bw = vjp_fn(cts, batched=True)
    assert bx.shape == (6, 4) and bw.shape == (6, 3, 4)
    for k in range(6):
        ex, ew = lvjp(cts[k])
        assert_close(bx[k], ex)
        assert_close(bw[k], ew)

    vjp_fn.close()
    with pytest.raises(rm.RemoteNotFound) as info:
        vjp_fn(ct)
    message = str(info.value)
    assert vjp_fn.handle in message and "closed" in message and "vjp again" in message
    assert bare.CloseVjp(pb.CloseVjpRequest(handle=vjp_fn.handle), timeout=10).closed is False

    out, fn = remote.vjp(two, V4, V4 + 1)  # pytree outputs
    lout, lfn = gs.vjp(two, V4, V4 + 1)
    assert_tree_close(out, lout)
    cot = {"a": rng.standard_normal(4), "b": rng.standard_normal(4)}
    with fn:
        assert_tree_close(fn(cot), lfn(cot))


@pytest.fixture(scope="module")
def ttl_server():
    with ServerProcess("--residual-ttl", "0.5") as s:
        yield s


def test_residual_session_expires_after_ttl(ttl_server):
    with gs.connect(ttl_server.address, timeout=10) as r:
        _, fn = r.vjp(seed_f, V4, V4 + 1)
        assert_tree_close(fn(1.0), gs.vjp(seed_f, V4, V4 + 1)[1](1.0))  # in time: works
        time.sleep(1.0)
        with pytest.raises(rm.RemoteNotFound) as info:
            fn(1.0)
        assert fn.handle in str(info.value) and "TTL" in str(info.value)


def test_residual_session_ttl_from_request_is_bounded(ttl_server):
    """A NaN (or any non-finite) ttl_seconds must not make a session immortal."""
    ch = channel(ttl_server.address)
    try:
        st = stub(ch)
        g = gs.trace(seed_f, V4, V4)
        st.RegisterGraph(pb.RegisterGraphRequest(graph=g.to_proto()), timeout=10)
        req = pb.OpenVjpRequest(graph_id=g.id, wrt=["x"], ttl_seconds=float("nan"))
        fill(req.inputs, {"x": V4, "y": V4})
        try:
            opened = st.OpenVjp(req, timeout=10)
        except grpc.RpcError as e:  # refusing the request is fine too
            assert e.code() == grpc.StatusCode.INVALID_ARGUMENT
            return
        assert math.isfinite(opened.ttl_seconds) and 0 < opened.ttl_seconds <= 3600, opened.ttl_seconds
        if opened.ttl_seconds <= 1.0:  # e.g. the server's default of 0.5 s: it must then expire
            time.sleep(opened.ttl_seconds + 0.5)
            err = rpc_error(st.CallVjp, pb.CallVjpRequest(handle=opened.handle), timeout=10)
            assert err.code() == grpc.StatusCode.NOT_FOUND
    finally:
        ch.close()


@pytest.fixture(scope="module")
def pressure_server():
    with ServerProcess("--residual-mib", "1") as s:
        yield s


def test_residual_sessions_released_under_memory_pressure(pressure_server):
    """Each session keeps ~640 KB (x and cos x of 40000 float64) under a 1 MiB budget."""
    x = np.linspace(0, 1, 40_000)
    with gs.connect(pressure_server.address, timeout=10) as r:
        _, old = r.vjp(seed_f, x, x)
        assert_tree_close(old(1.0), gs.vjp(seed_f, x, x)[1](1.0))
        _, new = r.vjp(seed_f, x, 2 * x)
        with pytest.raises(rm.RemoteNotFound) as info:
            old(1.0)
        assert old.handle in str(info.value) and "memory pressure" in str(info.value)
        assert_tree_close(new(1.0), gs.vjp(seed_f, x, 2 * x)[1](1.0))
        new.close()


def test_residual_session_over_the_whole_budget_is_resource_exhausted(pressure_server):
    """One session larger than --residual-mib is the server's configured limit, not a bad argument."""
    x = np.linspace(0, 1, 200_000)  # keeps 3.2 MB
    with gs.connect(pressure_server.address, timeout=10) as r:
        with pytest.raises(gs.RemoteError) as info:
            r.vjp(seed_f, x, x)
        assert "residual budget" in str(info.value)
        assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED, str(info.value)


# ---------------------------------------------------------------- error codes


def test_invalid_graph_names_the_node(remote, bare):
    x = Input(0, "x", "float64", (3,))
    unknown_op = Graph([x], [], [Node(1, "bogus", (0,), {}, "float64", (3,))], [("out", 1)])
    with pytest.raises(rm.RemoteInvalidArgument) as info:
        remote.register(unknown_op)
    assert "bogus" in str(info.value) and "%1" in str(info.value)
    wrong_type = Graph([x], [], [Node(1, "sin", (0,), {}, "float64", (4,))], [("out", 1)])
    err = rpc_error(bare.RegisterGraph, pb.RegisterGraphRequest(graph=wrong_type.to_proto()), timeout=10)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "%1:f64[4] = sin %0" in err.details()
    cycle = Graph([x], [], [Node(1, "add", (0, 1), {}, "float64", (3,))], [("out", 1)])
    err = rpc_error(bare.RegisterGraph, pb.RegisterGraphRequest(graph=cycle.to_proto()), timeout=10)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "%1" in err.details()


def test_invalid_inputs_name_the_input(remote, bare):
    g = gs.trace(seed_f, V4, V4)
    remote.register(g)
    cases = [
        ({"x": V4[:3], "y": V4}, "'x'"),  # wrong shape
        ({"x": V4}, "'y'"),  # missing
        ({"x": V4 > 0, "y": V4}, "'x'"),  # wrong dtype
        ({"x": V4, "y": V4, "z": V4}, "'z'"),  # unexpected
    ]
    for inputs, name in cases:
        with pytest.raises(rm.RemoteInvalidArgument) as info:
            remote.evaluate(g, inputs)
        assert name in str(info.value), str(info.value)
    req = _evaluate_request(g.id, {"x": V4, "y": V4})
    req.inputs["y"].data = b"abc"  # bytes that do not fill the declared shape
    err = rpc_error(bare.Evaluate, req, timeout=10)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "'y'" in err.details() and "32 bytes" in err.details()


CORRUPT = [b"\xff\xff\xff\xff", b"\x0a\xff", b"not a protobuf at all"]  # no message parses from these


@pytest.mark.parametrize(("method", "garbage"), [("RegisterGraph", g) for g in [*CORRUPT, b"\x0a\x05\x0a\x03abc"]] +
                         [(m, g) for m in ("Evaluate", "Gradient", "CallVjp") for g in CORRUPT])
def test_malformed_request_bytes_are_invalid_argument(chan, method, garbage):
    raw = chan.unary_unary(f"/{SERVICE}/{method}", request_serializer=None, response_deserializer=None)
    err = rpc_error(raw, garbage, timeout=10)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (err.code(), err.details())
    assert f"{method}Request" in err.details()
    assert health_status(chan) == SERVING


def test_unknown_ids_are_not_found(remote, bare):
    for gid in ("0" * 64, "no-such-graph", "../../etc/passwd", ""):
        with pytest.raises(rm.RemoteNotFound) as info:
            remote.evaluate(gid, {"x": V4})
        assert info.value.code == grpc.StatusCode.NOT_FOUND and "not registered" in str(info.value)
        err = rpc_error(bare.Gradient, pb.GradientRequest(graph_id=gid, wrt=["x"]), timeout=10)
        assert err.code() == grpc.StatusCode.NOT_FOUND
    err = rpc_error(bare.CallVjp, pb.CallVjpRequest(handle="deadbeef"), timeout=10)
    assert err.code() == grpc.StatusCode.NOT_FOUND and "deadbeef" in err.details()
    for method in ("Jvp", "Jacobian", "Hessian", "OpenVjp", "BatchGradient"):
        req = getattr(pb, f"{method}Request")(graph_id="f" * 64)
        assert rpc_error(getattr(bare, method), req, timeout=10).code() == grpc.StatusCode.NOT_FOUND, method


def test_message_over_the_size_limit_is_resource_exhausted():
    with ServerProcess("--max-message-mib", "1") as s, gs.connect(s.address, timeout=10) as r:
        big = np.zeros(300_000)  # 2.4 MB on the wire
        with pytest.raises(rm.RemoteResourceExhausted):
            r.evaluate(gs.trace(lambda x: x * 2.0, big), {"x": big})
        with pytest.raises(rm.RemoteResourceExhausted):  # a response over the limit too
            r.evaluate(gs.trace(lambda x: gs.broadcast_to(x, (200_000,)), 1.0), {"x": 1.0})
        small = np.arange(1000.0)  # the server still serves what fits
        assert_close(r.grad(lambda x: gs.sum(x * x))(small), 2 * small)


def test_limits_on_graphs_and_tensors_are_resource_exhausted(remote, bare):
    huge = Graph([Input(0, "x", "float64", (10**6, 10**6))], [], [], [("out", 0)])
    with pytest.raises(rm.RemoteResourceExhausted) as info:
        remote.register(huge)
    assert "'x'" in str(info.value) and "elements" in str(info.value)

    g = gs.trace(seed_f, V4, V4)
    remote.register(g)
    req = _evaluate_request(g.id, {"y": V4})
    req.inputs["x"].dtype = graph_pb2.FLOAT64
    req.inputs["x"].shape[:] = [10**6, 10**6]  # declared 10^12 elements, no data
    err = rpc_error(bare.Evaluate, req, timeout=10)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "'x'" in err.details()

    msg = graph_pb2.Graph()
    msg.inputs.add(id=0, name="x", dtype=graph_pb2.FLOAT64)
    for k in range(100_001):  # one node over the default limit of 100000
        msg.nodes.add(id=k + 1, op="neg", inputs=[k], dtype=graph_pb2.FLOAT64)
    msg.outputs.add(name="out", id=100_001)
    err = rpc_error(bare.RegisterGraph, pb.RegisterGraphRequest(graph=msg), timeout=30)
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "100001 nodes" in err.details()
    assert health_status(channel(remote.address)) == SERVING


def test_calls_over_max_concurrent_are_resource_exhausted(slow_reference):
    with ServerProcess("--max-concurrent", "1", "--metrics-port", "0") as s, \
            gs.connect(s.address, timeout=60) as r, gs.connect(s.address, timeout=10) as other:
        gid = r.register(gs.trace(SLOW, MX, MW))
        result: dict = {}

        def slow_call():
            try:
                result["value"] = r.evaluate(gid, MATRICES)["out"]
            except Exception as e:  # reported below
                result["error"] = e

        t = threading.Thread(target=slow_call)
        t.start()
        try:
            assert wait_until(lambda: metric(parse_metrics(scrape(s.metrics_port)), "gradserve_inflight_requests") == 1)
            with pytest.raises(rm.RemoteResourceExhausted) as info:
                other.graphs()
            assert "limit of 1 concurrent" in str(info.value)
        finally:
            t.join(60)
        assert "error" not in result, result
        assert_close(result["value"], slow_reference)
        assert other.graphs()[0].graph_id == gid  # the slot is free again
        samples = parse_metrics(scrape(s.metrics_port))
        assert metric(samples, "gradserve_requests_total", code="RESOURCE_EXHAUSTED", method="ListGraphs") == 1


def test_token_auth(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    with ServerProcess("--token-file", str(token_file)) as s:
        for token in (None, "wrong-token", "s3cret-token-and-more"):
            with gs.connect(s.address, token=token, timeout=10) as r:
                with pytest.raises(rm.RemoteUnauthenticated) as info:
                    r.grad(seed_f)(V4, V4)
                assert info.value.code == grpc.StatusCode.UNAUTHENTICATED and "token" in str(info.value)
        with gs.connect(s.address, token="s3cret-token", timeout=10) as r:
            assert_close(r.grad(seed_f)(V4, V4 + 1), gs.grad(seed_f)(V4, V4 + 1))
        ch = channel(s.address)  # probes stay open without a token
        try:
            assert health_status(ch) == SERVING
            assert health_status(ch, SERVICE) == SERVING
            assert SERVICE in _list_services(ch)
            err = rpc_error(stub(ch).ListGraphs, pb.ListGraphsRequest(), timeout=10)
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        finally:
            ch.close()


def test_deadline_shorter_than_the_work(server, remote, chan):
    gid = remote.register(gs.trace(HEAVY, MX, MW))
    before = parse_metrics(scrape(server.metrics_port))
    with gs.connect(server.address, timeout=0.05) as hurried:
        start = time.monotonic()
        with pytest.raises(rm.RemoteDeadlineExceeded) as info:
            hurried.evaluate(gid, MATRICES)
        assert time.monotonic() - start < 2.0
        assert info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED

    def server_gave_up():
        samples = parse_metrics(scrape(server.metrics_port))
        return metric(samples, "gradserve_requests_total", code="DEADLINE_EXCEEDED", method="Evaluate") == \
            metric(before, "gradserve_requests_total", code="DEADLINE_EXCEEDED", method="Evaluate") + 1
    assert wait_until(server_gave_up)  # the server stopped the work too
    assert health_status(chan) == SERVING and health_status(chan, SERVICE) == SERVING
    assert wait_until(lambda: metric(parse_metrics(scrape(server.metrics_port)), "gradserve_inflight_requests") == 0)
    assert_close(remote.grad(seed_f)(V4, V4), gs.grad(seed_f)(V4, V4))


# ---------------------------------------------------------------- restarts


def test_session_survives_restart_without_store():
    a = ServerProcess()
    b = c = None
    try:
        with gs.connect(a.address, timeout=30) as r:
            expected = gs.grad(seed_f, argnums=(0, 1))(V4, V4 + 1)
            assert_tree_close(r.grad(seed_f, argnums=(0, 1))(V4, V4 + 1), expected)
            a.kill()
            b = ServerProcess(port=a.port)  # the same port, an empty server
            assert_tree_close(r.grad(seed_f, argnums=(0, 1))(V4, V4 + 1), expected)  # re-registered invisibly
            ch = channel(b.address)
            assert gs.trace(seed_f, V4, V4 + 1).id in {i.graph_id for i in stub(ch).ListGraphs(pb.ListGraphsRequest()).graphs}
            ch.close()

            b.kill()  # now a call while nobody listens: retried (UNAVAILABLE) until the server is back
            result: dict = {}
            t = threading.Thread(target=lambda: result.setdefault("v", r.grad(seed_f, argnums=(0, 1))(V4, V4 + 1)))
            t.start()
            time.sleep(0.3)
            c = ServerProcess(port=a.port)
            t.join(30)
            assert "v" in result
            assert_tree_close(result["v"], expected)
    finally:
        for s in (a, b, c):
            if s is not None:
                s.close()


def test_store_survives_restart(tmp_path):
    g = gs.trace(seed_f, V4, V4)
    inputs = {"x": V4, "y": V4 + 3}
    with ServerProcess("--store", str(tmp_path)) as a, gs.connect(a.address, timeout=10) as r:
        assert r.register(g) == g.id
    with ServerProcess("--store", str(tmp_path)) as b:
        ch = channel(b.address)
        try:
            st = stub(ch)
            assert g.id in {i.graph_id for i in st.ListGraphs(pb.ListGraphsRequest(), timeout=10).graphs}
            resp = st.Evaluate(_evaluate_request(g.id, inputs), timeout=10)  # no RegisterGraph
            assert_close(decode(resp.outputs)["out"], LOCAL.evaluate(g, inputs)["out"])
            grads = decode(st.Gradient(_gradient_request(g.id, inputs, ["y"]), timeout=10).grads)
            assert_close(grads["y"], np.sin(V4))
        finally:
            ch.close()


def _damage_store(tmp_path):
    """Register three graphs, stop; damage one file so it no longer parses and tamper with a
    constant of another so it parses but fails its checksum. Returns (damaged, tampered, good)."""
    damaged = gs.trace(seed_f, V4, V4)
    tampered = gs.trace(lambda x: x * 3.25 + 1.5, V4)
    good = gs.trace(lambda x: gs.exp(x) - 1.0, V4)
    with ServerProcess("--store", str(tmp_path)) as a, gs.connect(a.address, timeout=10) as r:
        for g in (damaged, tampered, good):
            r.register(g)
    store = tmp_path / "graphs"
    assert sorted(p.name for p in store.glob("*.pb")) == sorted(f"{g.id}.pb" for g in (damaged, tampered, good))
    path = store / f"{damaged.id}.pb"
    data = bytearray(path.read_bytes())
    for i in range(10, 20):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    path = store / f"{tampered.id}.pb"
    data = bytearray(path.read_bytes())
    at = data.find(struct.pack("<d", 3.25))
    assert at >= 0
    data[at] ^= 0x01  # 3.25 -> 3.2500000000000004: still a valid graph, a different hash
    path.write_bytes(bytes(data))
    return damaged, tampered, good


def test_corrupted_store_file_is_reported_and_the_rest_serve(tmp_path):
    damaged, tampered, good = _damage_store(tmp_path)
    with ServerProcess("--store", str(tmp_path)) as b:
        ch = channel(b.address)
        try:
            st = stub(ch)
            for g, inputs in ((damaged, {"x": V4, "y": V4}), (tampered, {"x": V4})):
                err = rpc_error(st.Evaluate, _evaluate_request(g.id, inputs), timeout=10)
                assert err.code() == grpc.StatusCode.NOT_FOUND
                assert g.id in err.details() and "store" in err.details(), err.details()
            resp = st.Evaluate(_evaluate_request(good.id, {"x": V4}), timeout=10)
            assert_close(decode(resp.outputs)["out"], np.exp(V4) - 1.0)
            assert {i.graph_id for i in st.ListGraphs(pb.ListGraphsRequest(), timeout=10).graphs} == {good.id}
            assert health_status(ch) == SERVING
            with gs.connect(b.address, timeout=10) as r:  # a client that has the graph heals it
                assert_close(r.evaluate(damaged, {"x": V4, "y": V4})["out"], LOCAL.evaluate(damaged, {"x": V4, "y": V4})["out"])
        finally:
            ch.close()
    assert damaged.id in b.stderr()  # and the operator is told which file


def test_registering_again_repairs_a_corrupted_store_file(tmp_path):
    """The NOT_FOUND says 'register it again': doing so must put a good copy in the store."""
    damaged, tampered, _ = _damage_store(tmp_path)
    with ServerProcess("--store", str(tmp_path)) as b:
        ch = channel(b.address)
        try:
            st = stub(ch)
            for g in (damaged, tampered):
                st.RegisterGraph(pb.RegisterGraphRequest(graph=g.to_proto()), timeout=10)
        finally:
            ch.close()
    with ServerProcess("--store", str(tmp_path)) as c:
        ch = channel(c.address)
        try:
            st = stub(ch)
            for g, inputs in ((damaged, {"x": V4, "y": V4}), (tampered, {"x": V4})):
                resp = st.Evaluate(_evaluate_request(g.id, inputs), timeout=10)
                assert_close(decode(resp.outputs)["out"], LOCAL.evaluate(g, inputs)["out"])
        finally:
            ch.close()


# ---------------------------------------------------------------- health, reflection, TLS, shutdown


def _list_services(ch) -> list[str]:
    reflection = reflection_pb2_grpc.ServerReflectionStub(ch)
    responses = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
    return [s.name for r in responses for s in r.list_services_response.service]


def test_health(chan):
    assert health_status(chan, "") == SERVING
    assert health_status(chan, SERVICE) == SERVING
    err = rpc_error(health_pb2_grpc.HealthStub(chan).Check, health_pb2.HealthCheckRequest(service="no.Such"), timeout=10)
    assert err.code() == grpc.StatusCode.NOT_FOUND


def test_reflection(chan):
    services = _list_services(chan)
    assert SERVICE in services and "grpc.health.v1.Health" in services
    reflection = reflection_pb2_grpc.ServerReflectionStub(chan)
    req = reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE)
    (resp,) = list(reflection.ServerReflectionInfo(iter([req]), timeout=10))
    assert resp.file_descriptor_response.file_descriptor_proto
    assert any(b"GradientService" in f and b"RegisterGraph" in f for f in resp.file_descriptor_response.file_descriptor_proto)


def test_tls(tmp_path):
    cert, key, cert_pem = self_signed_cert(tmp_path)
    (tmp_path / "other").mkdir()
    _, _, other_pem = self_signed_cert(tmp_path / "other")
    with ServerProcess("--tls-cert", str(cert), "--tls-key", str(key)) as s:
        with gs.connect(s.address, tls=cert_pem, timeout=10) as r:
            assert_tree_close(r.grad(seed_f, argnums=(0, 1))(V4, V4 + 1), gs.grad(seed_f, argnums=(0, 1))(V4, V4 + 1))
        with gs.connect(f"localhost:{s.port}", tls=cert, timeout=10) as r:  # a CA path, the DNS name
            assert_close(r.evaluate(gs.trace(seed_f, V4, V4), {"x": V4, "y": V4})["out"],
                         LOCAL.evaluate(gs.trace(seed_f, V4, V4), {"x": V4, "y": V4})["out"])
        ch = channel(s.address)  # plaintext to the TLS port
        try:
            err = rpc_error(stub(ch).ListGraphs, pb.ListGraphsRequest(), timeout=10)
            assert err.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            ch.close()
        with gs.connect(s.address, timeout=1.5) as r, pytest.raises(rm.RemoteUnavailable):
            r.graphs()
        with gs.connect(s.address, tls=other_pem, timeout=1.5) as r, pytest.raises(rm.RemoteUnavailable):
            r.graphs()  # a certificate the client does not trust


def test_graceful_shutdown(slow_reference):
    grace = 8.0
    s = ServerProcess("--grace", str(grace), "--metrics-port", "0")
    ch = channel(s.address)
    try:
        with gs.connect(s.address, timeout=60) as r:
            gid = r.register(gs.trace(SLOW, MX, MW))
            watch = health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=30)
            assert next(watch).status == SERVING
            result: dict = {}

            def slow_call():
                try:
                    result["value"] = r.evaluate(gid, MATRICES)["out"]
                    result["done"] = time.monotonic()
                except Exception as e:  # reported below
                    result["error"] = e

            def refused() -> bool:
                """A new call fails UNAVAILABLE (False while the server still takes it)."""
                try:
                    stub(ch).ListGraphs(pb.ListGraphsRequest(), timeout=5)
                    return False
                except grpc.RpcError as e:
                    assert e.code() == grpc.StatusCode.UNAVAILABLE, (e.code(), e.details())
                    return True

            t = threading.Thread(target=slow_call)
            t.start()
            try:
                assert wait_until(lambda: metric(parse_metrics(scrape(s.metrics_port)), "gradserve_inflight_requests") == 1)
                signalled = time.monotonic()
                s.signal(signal.SIGTERM)
                assert next(watch).status == NOT_SERVING  # health goes NOT_SERVING at once
                watch.cancel()
                assert wait_until(refused, timeout=5)  # then new calls are refused
                # while draining, probes still get an answer: NOT_SERVING, so a balancer stops routing here
                check = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert check.status == NOT_SERVING
                with gs.connect(s.address, timeout=0.5) as late, pytest.raises(rm.RemoteUnavailable):
                    late.graphs()
            finally:
                t.join(60)
            assert "error" not in result, result  # the call in flight completed, after the signal
            assert result["done"] > signalled
            assert_close(result["value"], slow_reference)
            assert s.proc.wait(grace + 5) == 0
            assert time.monotonic() - signalled < grace
    finally:
        ch.close()
        s.close()


# ---------------------------------------------------------------- concurrency and metrics


def test_concurrent_clients_get_independent_results(server):
    n = 8
    inputs = [({"w": np.random.default_rng(k).standard_normal((4, 3)), "b": np.random.default_rng(k + 100).standard_normal(3)},
               np.random.default_rng(k + 200).standard_normal((5, 4))) for k in range(n)]
    barrier = threading.Barrier(n)
    results: list = [None] * n
    errors: list = []

    def client(k):
        try:
            with gs.connect(server.address, timeout=30) as r:
                barrier.wait(10)
                params, x = inputs[k]
                got = []
                for _ in range(5):
                    got.append(r.value_and_grad(mlp_loss)(params, x))
                    got.append(r.jvp(vec, (V4 * k, W34), (V4, W34)))
                results[k] = got
        except Exception as e:  # reported below
            errors.append((k, e))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    for k in range(n):
        params, x = inputs[k]
        expected_vg = gs.value_and_grad(mlp_loss)(params, x)
        expected_jvp = gs.jvp(vec, (V4 * k, W34), (V4, W34))
        for i, got in enumerate(results[k]):
            assert_tree_close(got, expected_vg if i % 2 == 0 else expected_jvp)


def test_metrics(server, remote, bare):
    g = gs.trace(seed_f, V4, V4)
    remote.register(g)
    before = parse_metrics(scrape(server.metrics_port))
    bare.Evaluate(_evaluate_request(g.id, {"x": V4, "y": V4}), timeout=10)
    rpc_error(bare.Evaluate, _evaluate_request("1" * 64, {"x": V4}), timeout=10)
    remote.grad(seed_f)(V4, V4)
    text = scrape(server.metrics_port)
    after = parse_metrics(text)

    def delta(name, **labels):
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert "# TYPE gradserve_requests_total counter" in text
    assert delta("gradserve_requests_total", code="OK", method="Evaluate") == 1
    assert delta("gradserve_requests_total", code="NOT_FOUND", method="Evaluate") == 1
    assert delta("gradserve_requests_total", code="OK", method="Gradient") == 1
    assert metric(after, "gradserve_requests_total", code="OK", method="RegisterGraph") >= 1
    assert delta("gradserve_request_seconds_count", method="Evaluate") == 2
    assert delta("gradserve_graph_cache_hits_total") == 2  # Evaluate, Gradient
    assert delta("gradserve_graph_cache_misses_total") == 1  # the unknown id
    assert metric(after, "gradserve_graphs") >= 1
    assert metric(after, "gradserve_inflight_requests") == 0
    methods = {dict(labels)["method"] for name, labels in after if name == "gradserve_requests_total"}
    assert {"Evaluate", "Gradient", "RegisterGraph"} <= methods


# ---------------------------------------------------------------- the command line


def _run_cli(*args, timeout=30):
    return subprocess.run([sys.executable, "-m", "gradserve_server", *args], capture_output=True, text=True,
                          timeout=timeout, env=child_env(), stdin=subprocess.DEVNULL)


def test_cli_help():
    done = _run_cli("--help")
    assert done.returncode == 0, done.stderr
    for flag in ("--port", "--max-message-mib", "--residual-ttl", "--store", "--token-file", "--tls-cert",
                 "--metrics-port", "--max-concurrent", "--grace"):
        assert flag in done.stdout


@pytest.mark.parametrize("content", ["", "  \n\n"])
def test_cli_empty_token_file(tmp_path, content):
    token_file = tmp_path / "token"
    token_file.write_text(content)
    done = _run_cli("--host", "127.0.0.1", "--port", "0", "--token-file", str(token_file))
    assert done.returncode != 0
    assert "listening" not in done.stdout
    assert done.stderr == f"gradserve: --token-file {token_file} is empty\n"


def test_cli_tls_flags_go_together(tmp_path):
    cert, _, _ = self_signed_cert(tmp_path)
    done = _run_cli("--host", "127.0.0.1", "--port", "0", "--tls-cert", str(cert))
    assert done.returncode != 0 and "--tls-cert and --tls-key go together" in done.stderr
