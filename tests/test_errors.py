"""The error family (gradserve_engine.errors) and how the service answers it: each class names
its gRPC status; a user's mistake is a class of the family, and so INVALID_ARGUMENT (or the
status its class names); anything else is a bug, answered INTERNAL with its traceback logged."""

from __future__ import annotations

import ast
import inspect
import itertools
import logging
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from service_fixtures import HOST, channel, child_env, fill, rpc_error, stub

import gradserve as gs
from gradserve import remote as rm
from gradserve_engine import errors
from gradserve_engine.engine import Engine
from gradserve_engine.errors import (
    FAMILY,
    GradserveError,
    GraphError,
    NotFound,
    ShapeError,
    StoreError,
    WorkersUnavailable,
)
from gradserve_engine.pool import LocalPool, Task, unwrap
from gradserve_engine.scheduler import DistributedEngine, Policy
from gradserve_engine.v1 import service_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
V3 = np.arange(3.0)


def f(x, n):
    return gs.sum(gs.sin(x) * n)


G = gs.trace(f, V3, np.arange(3))  # x float64, n int64


# ---------------------------------------------------------------- the family


def test_every_class_of_the_family_names_a_grpc_status():
    defined = {cls for _, cls in inspect.getmembers(errors, inspect.isclass)
               if issubclass(cls, GradserveError) and cls.__module__ == errors.__name__}
    assert defined == set(FAMILY)
    for cls in FAMILY:
        assert isinstance(cls.code, str) and cls.code in grpc.StatusCode.__members__, cls
        assert grpc.StatusCode[cls.code] != grpc.StatusCode.OK, cls
    expected = {"GraphError": "INVALID_ARGUMENT", "ShapeError": "INVALID_ARGUMENT", "ShardError": "INVALID_ARGUMENT",
                "InvalidRequest": "INVALID_ARGUMENT", "LimitError": "RESOURCE_EXHAUSTED", "NotFound": "NOT_FOUND",
                "TensorNotFound": "NOT_FOUND", "Cancelled": "CANCELLED", "WorkersUnavailable": "UNAVAILABLE",
                "StoreError": "FAILED_PRECONDITION", "StoreUnavailable": "UNAVAILABLE",
                "FailedPrecondition": "FAILED_PRECONDITION", "Overloaded": "RESOURCE_EXHAUSTED",
                "LinAlgError": "INVALID_ARGUMENT"}
    assert {cls.__name__: cls.code for cls in FAMILY if cls is not GradserveError} == expected
    assert not issubclass(NotFound, LookupError)  # a KeyError from a bug must not pass for an unknown id


def test_the_engine_does_not_import_grpc():
    """Status names are strings in the engine: only the server (and the generated stubs) know grpc."""
    for path in sorted((ROOT / "workers" / "gradserve_engine").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "grpc" or n.startswith("grpc.") or n.startswith("grpc_") for n in names), path
    code = "import sys, gradserve_engine.errors; print('grpc' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(), timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_worker_failures_come_back_as_their_own_class():
    with pytest.raises(ShapeError, match="boom"):
        unwrap(("error", "ShapeError", "boom"))
    with pytest.raises(RuntimeError, match="KeyError on a worker: 'x'") as info:  # a bug stays a bug
        unwrap(("error", "KeyError", "'x'"))
    assert not isinstance(info.value, GradserveError)
    pool = LocalPool(1)
    try:
        with pytest.raises(GraphError, match="'n' of dtype int64"):
            pool.get([pool.submit(Task(G, "vjp", {"x": V3, "n": np.arange(3)}, {"wrt": ["n"]}))])
    finally:
        pool.shutdown()


# ---------------------------------------------------------------- the service


@pytest.fixture
def in_process(serve_in_process):
    """A stub of an in-process server over a plain Engine (G registered), and the server."""
    server = serve_in_process(Engine())
    with channel(f"{HOST}:{server.port}") as ch:
        st = stub(ch)
        st.RegisterGraph(pb.RegisterGraphRequest(graph=G.to_proto()), timeout=10)
        yield st, server


def test_an_unexpected_error_in_the_engine_is_internal_and_logged(in_process, monkeypatch, caplog):
    st, server = in_process

    def broken(*args, **kwargs):
        raise KeyError("x")

    monkeypatch.setattr(server.engine, "vjp", broken)
    req = pb.GradientRequest(graph_id=G.id, wrt=["x"])
    fill(req.inputs, {"x": V3, "n": np.arange(3)})
    with caplog.at_level(logging.ERROR, logger="gradserve.servicer"):
        err = rpc_error(st.Gradient, req, timeout=10)
    assert err.code() == grpc.StatusCode.INTERNAL, (err.code(), err.details())
    assert err.details() == "internal error: KeyError: 'x'"
    logged = [r for r in caplog.records if r.name == "gradserve.servicer"]
    assert logged and logged[-1].exc_info is not None and logged[-1].exc_info[0] is KeyError


def test_user_mistakes_that_were_type_or_key_errors_are_invalid_argument(in_process):
    st, _ = in_process
    inputs = {"x": V3, "n": np.arange(3)}
    req = pb.GradientRequest(graph_id=G.id, wrt=["n"])  # an integer input has no gradient
    fill(req.inputs, inputs)
    err = rpc_error(st.Gradient, req, timeout=10)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "'n' of dtype int64" in err.details(), err.details()

    req = pb.JvpRequest(graph_id=G.id)
    fill(req.inputs, inputs)
    fill(req.tangents, {"n": np.ones(3, np.int64)})
    err = rpc_error(st.Jvp, req, timeout=10)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "'n'" in err.details(), err.details()

    ints = gs.trace(lambda x, n: (gs.sum(x), n + 1), V3, np.arange(3))  # an integer output has no Jacobian
    st.RegisterGraph(pb.RegisterGraphRequest(graph=ints.to_proto()), timeout=10)
    req = pb.JacobianRequest(graph_id=ints.id, wrt=["x"])
    fill(req.inputs, inputs)
    err = rpc_error(st.Jacobian, req, timeout=10)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a float value" in err.details(), err.details()

    req = pb.HessianRequest(graph_id=G.id, wrt=["x"], output="out")  # vectors, but none for x
    fill(req.inputs, inputs)
    fill(req.vectors, {"n": np.ones(3)})
    err = rpc_error(st.Hessian, req, timeout=10)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "['x']" in err.details(), err.details()

    req = pb.HessianRequest(graph_id=G.id, output="out")  # no wrt: an IndexError deep in the Jacobian, before
    fill(req.inputs, inputs)
    err = rpc_error(st.Hessian, req, timeout=10)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "wrt" in err.details(), err.details()


def test_an_input_named_twice_in_wrt_is_invalid_argument(in_process):
    st, _ = in_process
    req = pb.GradientRequest(graph_id=G.id, wrt=["x", "x"])  # once a KeyError while collecting the gradients
    fill(req.inputs, {"x": V3, "n": np.arange(3)})
    with pytest.raises(grpc.RpcError) as e:
        st.Gradient(req, timeout=10)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "['x'] more than once" in e.value.details()


class _Stuck(LocalPool):
    """Workers that never answer in time."""

    def submit(self, task):
        return self._threads.submit(time.sleep, 2)


def test_workers_that_do_not_answer_give_unavailable(serve_in_process):
    pool = _Stuck(2)
    engine = DistributedEngine(Engine(), pool, Policy(local_cores=1, cluster_cores=2, flops_per_core=1e3),
                               task_timeout=0.2)
    server = serve_in_process(engine)
    try:
        with channel(f"{HOST}:{server.port}") as ch:
            st = stub(ch)
            st.RegisterGraph(pb.RegisterGraphRequest(graph=G.to_proto()), timeout=10)
            req = pb.BatchGradientRequest(graph_id=G.id, wrt=["x"])  # two input sets: fanned out to the workers
            for _ in range(2):
                fill(req.items.add().inputs, {"x": V3, "n": np.arange(3)})
            err = rpc_error(st.BatchGradient, req, timeout=30)
        assert err.code() == grpc.StatusCode.UNAVAILABLE, (err.code(), err.details())
        assert "did not answer" in err.details()
        assert engine.modes["fan_out"] == 1
        with pytest.raises(WorkersUnavailable):  # the same through the engine, no server
            engine.batch_vjp(G, [({"x": V3, "n": np.arange(3)}, None)] * 2, ["x"])
    finally:
        pool.shutdown()


def test_sdk_remote_errors_are_named_apart_from_the_family():
    remote = {name: obj for name, obj in vars(rm).items() if isinstance(obj, type) and issubclass(obj, rm.RemoteError)}
    assert {obj.__name__ for obj in remote.values()} == set(remote)
    assert not set(remote) & {cls.__name__ for cls in FAMILY}
    for name, cls in remote.items():
        if cls is not rm.RemoteError:  # one class per status, named after it
            assert name == "Remote" + "".join(w.capitalize() for w in cls.code.name.split("_")), name
    answered = [cls for cls in FAMILY[1:] if cls is not StoreError]  # a bad store stops the server starting
    for cls in answered:  # every status the service answers has its SDK class
        assert rm._BY_CODE[grpc.StatusCode[cls.code]].code == grpc.StatusCode[cls.code]


def test_no_malformed_request_is_answered_internal(serve_in_process):
    """Requests put together from bad pieces (names the graph does not have, integer inputs
    differentiated, a name twice, wrong shapes and dtypes, empty lists) are the caller's
    mistakes: never INTERNAL, over the scheduler (in process, fanned out, graph-parallel)."""
    pool = LocalPool(2)
    engine = DistributedEngine(Engine(), pool, Policy(local_cores=1, cluster_cores=2, flops_per_core=1e3))
    server = serve_in_process(engine)
    g = gs.trace(lambda x, w, n: {"s": gs.sum(gs.tanh(w @ x) ** 2), "v": gs.tanh(w @ x), "k": n + 1},
                 V3, np.ones((2, 3)), np.arange(2))
    good = {"x": V3, "w": np.ones((2, 3)), "n": np.arange(2)}
    inputs = [good, {"x": V3}, {**good, "x": V3.astype(np.float32)}, {**good, "x": np.ones((2, 2))}, {**good, "z": V3}]
    wrts = [[], ["x"], ["n"], ["nope"], ["x", "x"], ["out.s"]]
    outputs = [[], ["out.s"], ["out.v"], ["out.k"], ["nope"], ["out.s", "out.s"]]
    answered = {}

    def call(method, req):
        try:
            method(req, timeout=20)
            code = grpc.StatusCode.OK
        except grpc.RpcError as e:
            code = e.code()
            assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), (code, e.details(), req)
        answered[code] = answered.get(code, 0) + 1

    try:
        with channel(f"{HOST}:{server.port}") as ch:
            st = stub(ch)
            st.RegisterGraph(pb.RegisterGraphRequest(graph=g.to_proto()), timeout=10)
            for feed, wrt, outs in itertools.product(inputs, wrts, outputs):
                call(st.Evaluate, _with_inputs(pb.EvaluateRequest(graph_id=g.id, outputs=outs), feed))
                for seeds in ({}, {"out.v": np.ones(2)}, {"out.k": np.ones(2)}, {"nope": V3}, {"out.v": V3}):
                    req = _with_inputs(pb.GradientRequest(graph_id=g.id, wrt=wrt, outputs=outs), feed)
                    fill(req.seeds, seeds)
                    call(st.Gradient, req)
                call(st.Jacobian, _with_inputs(pb.JacobianRequest(graph_id=g.id, wrt=wrt, outputs=outs), feed))
                call(st.OpenVjp, _with_inputs(pb.OpenVjpRequest(graph_id=g.id, wrt=wrt, outputs=outs), feed))
                batch = pb.BatchGradientRequest(graph_id=g.id, wrt=wrt, outputs=outs)
                for _ in range(2):
                    fill(batch.items.add().inputs, feed)
                call(st.BatchGradient, batch)
            for feed, wrt, output in itertools.product(inputs, wrts, ("out.s", "out.v", "out.k", "", "nope")):
                call(st.Hessian, _with_inputs(pb.HessianRequest(graph_id=g.id, wrt=wrt, output=output), feed))
                req = _with_inputs(pb.HessianRequest(graph_id=g.id, wrt=wrt, output=output), feed)
                fill(req.vectors, {x: good.get(x, V3) for x in wrt})
                call(st.Hessian, req)
            for feed, tangents in itertools.product(inputs, ({}, {"x": V3}, {"n": np.arange(2)}, {"nope": V3},
                                                            {"x": np.ones(2)})):
                req = _with_inputs(pb.JvpRequest(graph_id=g.id), feed)
                fill(req.tangents, tangents)
                call(st.Jvp, req)
            handle = st.OpenVjp(_with_inputs(pb.OpenVjpRequest(graph_id=g.id, wrt=["x"]), good), timeout=10).handle
            for cotangents, batched in itertools.product(({}, {"out.s": np.ones(())}, {"out.v": np.ones((3, 2))},
                                                          {"out.k": np.ones(2)}, {"nope": V3}), (False, True)):
                req = pb.CallVjpRequest(handle=handle, batched=batched)
                fill(req.cotangents, cotangents)
                call(st.CallVjp, req)
    finally:
        pool.shutdown()
    assert answered[grpc.StatusCode.OK] and answered[grpc.StatusCode.INVALID_ARGUMENT] > 1000, answered


def _with_inputs(req, feed):
    fill(req.inputs, feed)
    return req
