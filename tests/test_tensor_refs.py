"""Tensor references: data stays where it is used.

Against real `python -m gradserve_server` processes on 127.0.0.1 (the module's `server` with a
metrics port, and servers of their own for a small store, a small message limit and a restart):
  - `remote.put` / `remote.get` round-trip every dtype, 0-d, empty and non-contiguous arrays, and
    the ref's id is the content hash (the same on the client, `wire.tensor_id`);
  - a ref is accepted by every RPC that takes inputs (Evaluate, Gradient, BatchGradient, Jvp,
    Jacobian, Hessian and its vectors, OpenVjp and CallVjp's cotangents, SubmitJob) with the
    answers of the same call made with arrays; `keep=True` leaves results on the server as refs
    that later calls take;
  - bytes: with the parameters resident, a second gradient call sends at most the other inputs
    plus 4 KiB, and `gradserve_bytes_total` counts exactly the serialised request and response;
  - the SDK uploads again what the server lost: a restarted server, a released or evicted tensor;
    under the store's byte bound the least recently used go first, pinned ones (a job's, a
    residual session's) stay;
  - a tensor several times the message limit streams both ways and feeds a call;
  - chunks are validated (bytes against dtype x shape, element and byte limits before allocating,
    dtype and shape only on the first chunk, bool bytes) and a ref is refused in a graph constant;
  - in process: the store's LRU, TTL, pins and release on a fake clock, and the chunk parser
    against protobuf's on other encodings of the same message.
"""

from __future__ import annotations

import hashlib
import threading

import grpc
import numpy as np
import pytest
from numeric import close, tree_close
from service_fixtures import ServerProcess, metric, parse_metrics, rpc_error, scrape, wait_until

import gradserve as gs
from gradserve import optim
from gradserve import remote as rm
from gradserve_engine import wire
from gradserve_engine.errors import InvalidRequest, LimitError, ShapeError, TensorNotFound
from gradserve_engine.ir import Limits, tensor_to_proto
from gradserve_engine.v1 import graph_pb2
from gradserve_engine.v1 import service_pb2 as pb
from gradserve_server.metrics import Metrics
from gradserve_server.tensors import TensorStore, refs_in

MiB = 1 << 20
SERVICE = "gradserve.v1.GradientService"
RNG = np.random.default_rng(7)
W = RNG.standard_normal((6, 4))
B = RNG.standard_normal(4)
X = RNG.standard_normal((5, 6))
PARAMS = {"w": W, "b": B}


def loss(params, x):
    h = gs.tanh(x @ params["w"] + params["b"])
    return gs.mean(h * h) + gs.sum(gs.sin(params["b"]))


def vec(x, w):
    return gs.tanh(x @ w) * 2.0


def bytes_in(server) -> float:
    return metric(parse_metrics(scrape(server.metrics_port)), "gradserve_bytes_total", path="client_server", direction="in")


def bytes_out(server) -> float:
    return metric(parse_metrics(scrape(server.metrics_port)), "gradserve_bytes_total", path="client_server", direction="out")


def raw_put(ch: grpc.Channel):
    return ch.stream_unary(f"/{SERVICE}/PutTensor", request_serializer=None,
                           response_deserializer=pb.PutTensorResponse.FromString)


def chunk_msg(**fields) -> bytes:
    return pb.TensorChunk(**fields).SerializeToString()


# ---------------------------------------------------------------- put and get


@pytest.mark.parametrize("a", [
    np.arange(12.0).reshape(3, 4), np.float32(2.5) * np.ones((2, 3), np.float32), np.arange(7, dtype=np.int32),
    np.arange(-3, 3, dtype=np.int64), np.array([True, False, True]), np.array(3.25), np.zeros((0, 5)),
    np.arange(24.0).reshape(4, 6)[:, ::2],  # not contiguous
], ids=["f64", "f32", "i32", "i64", "bool", "0-d", "empty", "strided"])
def test_put_get_round_trip(remote, a):
    ref = remote.put(a)
    assert isinstance(ref, gs.TensorRef)
    assert ref.dtype == a.dtype and ref.shape == a.shape and ref.nbytes == a.nbytes
    assert ref.id == wire.tensor_id(a)  # content-addressed: the client computes the same id
    data = np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes()  # the id as README defines it
    h = hashlib.sha256(f"gradserve.tensor.v2\n{a.dtype.name} [{','.join(map(str, a.shape))}]\n".encode())
    for i in range(0, len(data), 1 << 20):
        h.update(hashlib.sha256(data[i:i + (1 << 20)]).digest())
    assert ref.id == h.hexdigest()
    back = remote.get(ref)
    assert back.dtype == a.dtype and back.shape == a.shape
    np.testing.assert_array_equal(back, a)
    assert remote.put(a) == ref  # idempotent: the same content, the same id, one copy
    assert sum(t.ref == ref.id for t in remote.tensors().tensors) == 1


def test_put_returns_the_tree_and_get_takes_it(remote):
    tree = {"layers": [W, (B, "static")], "n": None}
    refs = remote.put(tree)
    assert isinstance(refs["layers"][0], gs.TensorRef) and refs["layers"][1][1] == "static" and refs["n"] is None
    back = remote.get(refs)
    np.testing.assert_array_equal(back["layers"][0], W)
    np.testing.assert_array_equal(back["layers"][1][0], B)
    assert back["layers"][1][1] == "static"
    assert back["layers"][0].flags.writeable  # the caller's own array
    listed = {t.ref: t for t in remote.tensors().tensors}
    assert listed[refs["layers"][0].id].bytes == W.nbytes and list(listed[refs["layers"][0].id].shape) == [6, 4]


def test_a_ref_is_not_an_array_here():
    ref = gs.TensorRef("0" * 64, np.float64, (3,))
    with pytest.raises(TypeError, match=r"remote\.get"):
        np.asarray(ref)
    with pytest.raises(TypeError, match="held by a gradserve server"):
        gs.grad(lambda x: gs.sum(x * x))(ref)


# ---------------------------------------------------------------- refs in every RPC that takes inputs


def test_refs_in_the_functional_api(remote):
    p_ref, x_ref = remote.put(PARAMS), remote.put(X)
    tree_close(remote.grad(loss)(p_ref, X), gs.grad(loss)(PARAMS, X))  # Gradient
    tree_close(remote.grad(loss, argnums=(0, 1))(p_ref, x_ref), gs.grad(loss, argnums=(0, 1))(PARAMS, X))
    v, g = remote.value_and_grad(loss)(p_ref, x=x_ref)
    v0, g0 = gs.value_and_grad(loss)(PARAMS, x=X)
    close(v, v0)
    tree_close(g, g0)
    w_ref, xv = remote.put(W), RNG.standard_normal(6)
    xv_ref = remote.put(xv)
    tree_close(remote.jvp(vec, (xv_ref, w_ref), (remote.put(np.ones(6)), np.zeros_like(W))),  # Jvp, tangents too
               gs.jvp(vec, (xv, W), (np.ones(6), np.zeros_like(W))))
    tree_close(remote.jacobian(vec)(xv_ref, w_ref), gs.jacobian(vec)(xv, W))  # Jacobian

    def quartic(x, w):
        return gs.sum(vec(x, w) ** 2) + gs.sum(x ** 4)

    close(remote.hessian(quartic)(xv_ref, W), gs.hessian(quartic)(xv, W))  # Hessian
    tree_close(remote.hvp(quartic, (xv_ref, w_ref), (remote.put(np.ones(6)), np.ones_like(W))),  # Hessian's vectors
               gs.hvp(quartic, (xv, W), (np.ones(6), np.ones_like(W))))
    out, vjp_fn = remote.vjp(vec, xv_ref, w_ref)  # OpenVjp
    out0, vjp0 = gs.vjp(vec, xv, W)
    close(out, out0)
    ct = RNG.standard_normal(4)
    tree_close(vjp_fn(remote.put(ct)), vjp0(ct))  # CallVjp's cotangents
    kept = vjp_fn(ct, keep=True)
    assert all(isinstance(k, gs.TensorRef) for k in kept)
    tree_close(remote.get(kept), vjp0(ct))
    vjp_fn.close()


def test_refs_in_the_graph_level_api(remote):
    g = gs.trace(loss, PARAMS, X)
    names = g.input_names()
    refs = dict(zip(names, remote.put([W, B, X]), strict=True))
    arrays = dict(zip(names, [W, B, X], strict=True))
    close(remote.evaluate(g, refs)["out"], remote.evaluate(g, arrays)["out"])  # Evaluate
    res, res0 = remote.gradient(g, refs, wrt=names[:2]), remote.gradient(g, arrays, wrt=names[:2])
    tree_close(res.grads, res0.grads)
    items = [refs, {**refs, names[2]: X + 1}]
    got = remote.batch_gradient(g, items, wrt=names[:2], seeds=[{"out": remote.put(np.array(2.0))}, {"out": 1.0}])
    want = remote.batch_gradient(g, [arrays, {**arrays, names[2]: X + 1}], wrt=names[:2], seeds=[{"out": 2.0}, {"out": 1.0}])
    for a, b in zip(got, want, strict=True):  # BatchGradient, seeds too
        tree_close(a.grads, b.grads)


def test_keep_leaves_results_on_the_server(remote):
    p_ref = remote.put(PARAMS)
    kept = remote.grad(loss, keep=True)(p_ref, X)
    assert set(kept) == {"w", "b"} and all(isinstance(r, gs.TensorRef) for r in kept.values())
    assert kept["w"].shape == W.shape and kept["w"].dtype == np.float64
    tree_close(remote.get(kept), gs.grad(loss)(PARAMS, X))
    v, kept2 = remote.value_and_grad(loss, keep=True)(p_ref, X)
    assert isinstance(v, np.ndarray) and kept2 == kept  # the loss comes back; equal gradients, equal ids

    def step(params, grads):
        return {k: params[k] - 0.1 * grads[k] for k in params}

    g = gs.trace(step, PARAMS, PARAMS)
    names = g.input_names()
    new = remote.evaluate(g, dict(zip(names, [p_ref["w"], p_ref["b"], kept["w"], kept["b"]], strict=True)), keep=True)
    assert all(isinstance(r, gs.TensorRef) for r in new.values())  # an SGD step with nothing but refs
    grads = gs.grad(loss)(PARAMS, X)
    close(remote.get(new[g.output_names()[0]]), W - 0.1 * grads["w"])
    lg = gs.trace(loss, PARAMS, X)
    pw, pb_, px = lg.input_names()
    res = remote.gradient(lg, {pw: p_ref["w"], pb_: p_ref["b"], px: X}, wrt=[pw, pb_], keep=True)
    assert all(isinstance(r, gs.TensorRef) for r in res.grads.values()) and isinstance(res.outputs["out"], np.ndarray)
    assert {r.id for r in res.grads.values()} == {kept["w"].id, kept["b"].id}
    batch = remote.batch_gradient(lg, [{pw: W, pb_: B, px: X}], wrt=[pw, pb_], keep=True)
    assert batch[0].grads == res.grads


def test_refs_in_jobs(remote, server):
    rng = np.random.default_rng(3)
    Xd, w_true = rng.standard_normal((2048, 3)), np.array([1.0, -2.0, 0.5])
    yd = Xd @ w_true

    def mse(p, X, y):
        return gs.mean((X @ p["w"] + p["b"] - y) ** 2)

    p0 = {"w": np.zeros(3), "b": np.zeros(())}
    p_ref, X_ref, y_ref = remote.put(p0), remote.put(Xd), remote.put(yd)
    before = bytes_in(server)
    job = remote.minimize(mse, p_ref, args=(X_ref, y_ref), optimizer=optim.Adam(lr=0.05), steps=400, name="refs")
    sent = bytes_in(server) - before
    assert sent < Xd.nbytes, f"SubmitJob sent {sent} bytes: the data went again"  # the refs (and the graph) only
    pinned = {t.ref for t in remote.tensors().tensors if t.pinned}
    running = job.info().status not in ("succeeded", "failed", "cancelled")
    res = job.wait(timeout=60).result()
    local = gs.minimize(mse, p0, args=(Xd, yd), optimizer=optim.Adam(lr=0.05), steps=400)
    assert res.status == local.status == 1 and res.nit == local.nit
    close(res.x["w"], local.x["w"])
    if running:  # the job pinned the tensors it was given while it ran
        assert {X_ref.id, y_ref.id, p_ref["w"].id} <= pinned
    assert wait_until(lambda: not any(t.pinned for t in remote.tensors().tensors if t.ref == X_ref.id))  # and no longer
    # minibatches cut from refs: the trace takes the batch's shape, the server the full data
    job = remote.minimize(mse, p_ref, args=(X_ref, y_ref), optimizer=optim.Adam(lr=0.05), steps=5, batch_size=16)
    assert job.wait(timeout=60).result().success


def test_a_job_pins_its_tensors_until_it_finishes(tmp_path):
    """A long job on a store too small for another tensor: its tensors are neither evicted nor
    released while it runs, then they go like any other."""
    with ServerProcess("--tensor-store-mib", "1") as s, gs.connect(s.address, timeout=30) as r:
        Xd = np.random.default_rng(0).standard_normal((4096, 16))  # 512 KiB

        def f(p, X):
            return gs.mean((X @ p) ** 2)

        X_ref = r.put(Xd, hold=False)
        job = r.minimize(f, np.ones(16), args=(X_ref,), optimizer=optim.Adam(lr=1e-3), steps=100_000)
        assert r.release(X_ref) == 1  # asked to go: it stays while the job runs
        other = np.ones(80_000)  # 625 KiB: fits only if X goes
        with pytest.raises(rm.RemoteResourceExhausted, match="pinned"):
            r.put(other, hold=False)
        assert any(t.ref == X_ref.id and t.pinned for t in r.tensors().tensors)
        close(r.get(X_ref), Xd)
        job.cancel()
        assert job.info().status == "cancelled"
        assert wait_until(lambda: X_ref.id not in {t.ref for t in r.tensors().tensors})  # released, now unpinned
        r.put(other, hold=False)


def test_a_residual_session_pins_its_inputs():
    with ServerProcess("--tensor-store-mib", "1") as s, gs.connect(s.address, timeout=30) as r:
        xv = np.random.default_rng(1).standard_normal(60_000)  # 469 KiB
        x_ref = r.put(xv, hold=False)
        _, vjp_fn = r.vjp(lambda x: gs.sum(gs.sin(x)), x_ref)
        with pytest.raises(rm.RemoteResourceExhausted):
            r.put(np.ones(80_000), hold=False)  # would need the session's input evicted
        vjp_fn.close()
        r.put(np.ones(80_000), hold=False)  # now it may go
        assert x_ref.id not in {t.ref for t in r.tensors().tensors}


# ---------------------------------------------------------------- bytes


def test_resident_parameters_leave_only_the_other_inputs_on_the_wire(remote, server):
    rng = np.random.default_rng(0)
    params = {"w1": rng.standard_normal((256, 512)) * 0.05, "b1": np.zeros(512), "w2": rng.standard_normal((512, 10)) * 0.05}
    x, y = rng.standard_normal((32, 256)), rng.integers(0, 10, 32)

    def mlp(p, x, y):
        return gs.cross_entropy(gs.tanh(x @ p["w1"] + p["b1"]) @ p["w2"], y)

    g = remote.grad(mlp)
    full = bytes_in(server)
    want = g(params, x, y)
    full = bytes_in(server) - full
    assert full > sum(a.nbytes for a in params.values())
    p_ref = remote.put(params)
    tree_close(g(p_ref, x, y), want)  # the first call with refs (a new signature: it registers nothing new)
    before, out_before = bytes_in(server), bytes_out(server)
    tree_close(g(p_ref, x, y), want)
    sent, received = bytes_in(server) - before, bytes_out(server) - out_before
    assert sent <= x.nbytes + y.nbytes + 4096, (sent, x.nbytes + y.nbytes)
    assert received >= sum(a.nbytes for a in params.values())  # the gradients came back
    before, out_before = bytes_in(server), bytes_out(server)
    kept = remote.grad(mlp, keep=True)(p_ref, x, y)
    assert bytes_in(server) - before <= x.nbytes + y.nbytes + 4096
    assert bytes_out(server) - out_before <= 4096  # with keep=True nothing big comes back either
    tree_close(remote.get(kept), want)


def test_bytes_counter_counts_serialised_requests_and_responses(server, chan):
    g = gs.trace(loss, PARAMS, X)
    with gs.connect(server.address) as r:
        refs = r.put(PARAMS)
        r.register(g)
    names = g.input_names()
    req = pb.GradientRequest(graph_id=g.id, wrt=names[:2])
    refs["w"].to_proto(req.inputs[names[0]])
    refs["b"].to_proto(req.inputs[names[1]])
    tensor_to_proto(X, req.inputs["x"])
    call = chan.unary_unary(f"/{SERVICE}/Gradient", request_serializer=None, response_deserializer=None)
    raw = req.SerializeToString()
    before_in, before_out = bytes_in(server), bytes_out(server)
    resp = call(raw, timeout=10)
    assert bytes_in(server) - before_in == len(raw)
    assert bytes_out(server) - before_out == len(resp)
    before_in, before_out = bytes_in(server), bytes_out(server)
    chunks = list(wire.chunks(X, 100))
    raw_put(chan)(iter(chunks), timeout=10)
    assert bytes_in(server) - before_in == sum(map(len, chunks))


# ---------------------------------------------------------------- what the server lost, the SDK uploads again


def test_reupload_after_a_server_restart():
    a = ServerProcess()
    b = None
    try:
        with gs.connect(a.address, timeout=30) as r:
            p_ref, x_ref = r.put(PARAMS), r.put(X)
            want = gs.grad(loss)(PARAMS, X)
            tree_close(r.grad(loss)(p_ref, x_ref), want)
            a.kill()
            b = ServerProcess(port=a.port)  # an empty server on the same port: no graph, no tensor
            tree_close(r.grad(loss)(p_ref, x_ref), want)  # registered and uploaded again, invisibly
            held = {t.ref for t in r.tensors().tensors}
            assert {p_ref["w"].id, p_ref["b"].id, x_ref.id} <= held
            b.kill()
            b = ServerProcess(port=a.port)
            np.testing.assert_array_equal(r.get(x_ref), X)  # get uploads it again too
    finally:
        for s in (a, b):
            if s is not None:
                s.close()


def test_released_or_unheld_refs(remote, bare):
    ref = remote.put(X)
    assert remote.release(ref) == 1
    assert ref.id not in {t.ref for t in remote.tensors().tensors}
    with pytest.raises(rm.RemoteNotFound, match=ref.id):  # released here too: nothing to upload again
        remote.grad(lambda x: gs.sum(x * x))(ref)
    with pytest.raises(rm.RemoteNotFound, match=ref.id):
        remote.get(ref)
    ref = remote.put(X, hold=False)
    bare.ReleaseTensor(pb.ReleaseTensorRequest(refs=[ref.id]), timeout=10)  # the server let go, the SDK holds nothing
    with pytest.raises(rm.RemoteNotFound):
        remote.grad(lambda x: gs.sum(x * x))(ref)
    held = np.arange(5.0)
    ref = remote.put(held)
    bare.ReleaseTensor(pb.ReleaseTensorRequest(refs=[ref.id]), timeout=10)
    held[0] = 99.0  # changed after put: the SDK will not upload other values under the old id
    with pytest.raises(rm.RemoteNotFound, match="changed since"):
        remote.grad(lambda x: gs.sum(x * x))(ref)


def test_unknown_ref_is_not_found_naming_every_missing_id(bare, chan):
    g = gs.trace(loss, PARAMS, X)
    bare.RegisterGraph(pb.RegisterGraphRequest(graph=g.to_proto()), timeout=10)
    names = g.input_names()
    req = pb.GradientRequest(graph_id=g.id, wrt=names[:1])
    missing = sorted(hashlib.sha256(bytes([k])).hexdigest() for k in range(2))
    gs.TensorRef(missing[0], np.float64, W.shape).to_proto(req.inputs[names[0]])
    gs.TensorRef(missing[1], np.float64, B.shape).to_proto(req.inputs[names[1]])
    tensor_to_proto(X, req.inputs["x"])
    err = rpc_error(bare.Gradient, req, timeout=10)
    assert err.code() == grpc.StatusCode.NOT_FOUND and "tensor store" in err.details()
    assert dict(err.trailing_metadata())[wire.MISSING_KEY].split(",") == missing


@pytest.mark.parametrize(("case", "code", "says"), [
    ("not hex", grpc.StatusCode.INVALID_ARGUMENT, "not a tensor reference"),
    ("ref and data", grpc.StatusCode.INVALID_ARGUMENT, "carries no data"),
    ("wrong shape", grpc.StatusCode.INVALID_ARGUMENT, "the request says f64[5]"),
])
def test_bad_refs_in_requests(remote, bare, case, code, says):
    ref = remote.put(np.arange(4.0))
    g = gs.trace(lambda x: gs.sum(x * x), np.arange(4.0))
    bare.RegisterGraph(pb.RegisterGraphRequest(graph=g.to_proto()), timeout=10)
    req = pb.EvaluateRequest(graph_id=g.id)
    t = ref.to_proto(req.inputs["x"])
    if case == "not hex":
        t.ref = "../../etc/passwd"
    elif case == "ref and data":
        t.data = b"\0" * 32
    else:
        t.shape[:] = [5]
    err = rpc_error(bare.Evaluate, req, timeout=10)
    assert err.code() == code and says in err.details(), err.details()


def test_a_ref_is_refused_in_a_graph_constant(bare):
    msg = gs.trace(lambda x: x + np.arange(3.0), np.arange(3.0)).to_proto()
    assert len(msg.constants) == 1
    msg.constants[0].value.Clear()
    msg.constants[0].value.ref = wire.tensor_id(np.arange(3.0))
    err = rpc_error(bare.RegisterGraph, pb.RegisterGraphRequest(graph=msg), timeout=10)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "constant %1" in err.details() and "reference" in err.details()


# ---------------------------------------------------------------- the store's bound and large tensors


def test_eviction_under_the_byte_bound():
    with ServerProcess("--tensor-store-mib", "1", "--metrics-port", "0") as s, gs.connect(s.address, timeout=30) as r:
        parts = [np.full(40_000, float(k)) for k in range(4)]  # 312.5 KiB each: three fit in 1 MiB
        refs = [r.put(p) for p in parts[:3]]
        r.get(refs[0])  # a use: refs[1] is now the least recently used
        r.put(parts[3])
        listed = {t.ref for t in r.tensors().tensors}
        assert refs[1].id not in listed and {refs[0].id, refs[2].id} <= listed
        assert r.tensors().bytes <= MiB
        samples = parse_metrics(scrape(s.metrics_port))
        assert metric(samples, "gradserve_tensors_dropped_total", reason="evicted") == 1
        assert metric(samples, "gradserve_tensor_store_bytes") == 3 * parts[0].nbytes
        close(r.grad(lambda x: gs.sum(x * x))(refs[1]), 2 * parts[1])  # uploaded again (the session held it)
        with pytest.raises(rm.RemoteResourceExhausted, match="tensor-store-mib"):
            r.put(np.zeros(MiB // 8 + 1))  # over the whole bound: refused before it is received
        with gs.connect(s.address, timeout=30) as other:  # a session that never held the array cannot
            for p in parts:  # push everything else out
                other.put(p + 10, hold=False)
            with pytest.raises(rm.RemoteNotFound):
                other.get(refs[0])


def test_a_tensor_larger_than_the_message_limit_streams():
    with ServerProcess("--max-message-mib", "1") as s, gs.connect(s.address, timeout=60) as r:
        big = np.random.default_rng(5).standard_normal(3 * MiB // 8 + 123)  # 3 MiB and a bit: a few messages' worth
        with pytest.raises(rm.RemoteResourceExhausted):
            r.evaluate(gs.trace(lambda x: gs.sum(x), big), {"x": big})  # as a plain input it is over the limit
        ref = r.put(big)
        np.testing.assert_array_equal(r.get(ref), big)
        close(r.evaluate(gs.trace(lambda x: gs.sum(x), big), {"x": ref})["out"], np.sum(big))
        kept = r.grad(lambda x: gs.sum(x * x), keep=True)(ref)  # a result over the limit stays there
        close(r.get(kept), 2 * big)


# ---------------------------------------------------------------- chunks on the wire


def test_chunks_are_validated(server, chan):
    put = raw_put(chan)
    ok = list(wire.chunks(np.arange(10.0), 24))
    cases = {
        "no chunk": ([], grpc.StatusCode.INVALID_ARGUMENT, "carried no chunk"),
        "no dtype": ([chunk_msg(shape=[2], data=b"\0" * 16)], grpc.StatusCode.INVALID_ARGUMENT, "known dtype"),
        "short": (ok[:-1], grpc.StatusCode.INVALID_ARGUMENT, "needs 80 bytes, the chunks carried 72"),
        "long": ([*ok, chunk_msg(data=b"\0")], grpc.StatusCode.INVALID_ARGUMENT, "carry more"),
        "type again": ([ok[0], chunk_msg(dtype=graph_pb2.FLOAT64, shape=[10], data=b"\0" * 56)],
                       grpc.StatusCode.INVALID_ARGUMENT, "only the first chunk"),
        "bool bytes": ([chunk_msg(dtype=graph_pb2.BOOL, shape=[3], data=b"\0\1\2")], grpc.StatusCode.INVALID_ARGUMENT,
                       "bool data"),
        "wrong ref": ([chunk_msg(dtype=graph_pb2.FLOAT64, shape=[1], data=b"\0" * 8, ref="0" * 64)],
                      grpc.StatusCode.INVALID_ARGUMENT, "hashes to"),
        "over the element limit": ([chunk_msg(dtype=graph_pb2.FLOAT64, shape=[1 << 40])], grpc.StatusCode.RESOURCE_EXHAUSTED,
                                   "elements"),
        "negative dim": ([chunk_msg(dtype=graph_pb2.FLOAT64, shape=[-1])], grpc.StatusCode.INVALID_ARGUMENT, "negative"),
        "over the store": ([chunk_msg(dtype=graph_pb2.FLOAT64, shape=[1 << 28])], grpc.StatusCode.RESOURCE_EXHAUSTED,
                           "tensor-store-mib"),
        "junk": ([b"\xff\xff\xff"], grpc.StatusCode.INVALID_ARGUMENT, "tensor chunk"),
    }
    for label, (msgs, code, says) in cases.items():
        err = rpc_error(put, iter(msgs), timeout=10)
        assert err.code() == code and says in err.details(), (label, err.code(), err.details())
    resp = put(iter(ok), timeout=10)
    assert resp.tensor.ref == wire.tensor_id(np.arange(10.0)) and resp.tensor.bytes == 80


def test_get_unknown_and_bad_refs(bare):
    for ref, code in (("f" * 64, grpc.StatusCode.NOT_FOUND), ("nope", grpc.StatusCode.INVALID_ARGUMENT)):
        err = rpc_error(lambda r: list(bare.GetTensor(pb.GetTensorRequest(ref=r), timeout=10)), ref)
        assert err.code() == code, err.details()
    err = rpc_error(bare.ReleaseTensor, pb.ReleaseTensorRequest(refs=["x"]), timeout=10)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_the_chunk_parser_reads_what_protobuf_writes():
    data = bytes(range(256)) * 3
    msg = pb.TensorChunk(dtype=graph_pb2.INT64, shape=[3, -2, 1 << 40], data=data, ref="ab")
    assert wire.parse_chunk(msg.SerializeToString()) == (graph_pb2.INT64, [3, -2, 1 << 40], memoryview(data), "ab")
    # the same fields in another order, the dims unpacked, unknown fields of every wire type, a repeated scalar
    other = (b"\x22\x02ab" + b"\x10\x03" + b"\x1a" + bytes([len(b"old")]) + b"old" + b"\x38\x05" + b"\x41" + b"\0" * 8
             + b"\x08\x01" + b"\x1a" + bytes([0x80, 0x06]) + data + b"\x4d\0\0\0\0" + b"\x52\x01z" + b"\x08\x03")
    parsed = pb.TensorChunk.FromString(other)
    assert wire.parse_chunk(other) == (parsed.dtype, list(parsed.shape), memoryview(parsed.data), parsed.ref)
    for bad in (b"\x1a\x05ab", b"\x08", b"\x0b", b"\x00\x01", b"\xff" * 11):
        with pytest.raises(InvalidRequest):
            wire.parse_chunk(bad)


def test_reflection_lists_the_tensor_rpcs(chan):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    req = reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE)
    (resp,) = list(reflection_pb2_grpc.ServerReflectionStub(chan).ServerReflectionInfo(iter([req]), timeout=10))
    protos = resp.file_descriptor_response.file_descriptor_proto
    for name in (b"PutTensor", b"GetTensor", b"ReleaseTensor", b"ListTensors", b"TensorChunk"):
        assert any(name in f for f in protos), name


# ---------------------------------------------------------------- the store in process


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _put(store: TensorStore, a: np.ndarray) -> str:
    return store.receive(wire.chunks(a, 64))[0]


def test_store_lru_ttl_pins_and_release():
    clock = Clock()
    store = TensorStore(max_bytes=3 * 800, ttl=10.0, metrics=Metrics(), clock=clock)
    ids = [_put(store, np.full(100, float(k))) for k in range(3)]  # 800 bytes each: full
    alive = [True]
    store.pin([ids[0]], lambda: alive[0])
    clock.t = 5.0
    store.get(ids[1])
    fourth = _put(store, np.full(100, 3.0))  # evicts the least recently used unpinned: ids[2]
    assert store.missing([*ids, fourth]) == [ids[2]]
    clock.t = 14.0  # ids[0] idle 14 s but pinned; fourth and ids[1] idle 9 s
    assert store.missing([*ids[:2], fourth]) == []
    clock.t = 15.5  # past the TTL: ids[1] and fourth go, the pinned one stays
    assert store.missing([*ids[:2], fourth]) == sorted([ids[1], fourth])
    assert store.release([ids[0]]) == 1 and store.missing([ids[0]]) == []  # pinned: goes once unpinned
    alive[0] = False
    assert store.missing([ids[0]]) == [ids[0]]
    with pytest.raises(TensorNotFound) as info:
        store.get(ids[0])
    assert info.value.refs == (ids[0],)
    with pytest.raises(LimitError):
        _put(store, np.zeros(301))  # over the bound: refused before the bytes are read
    assert store.list(None, 10)[0].bytes == 0


def test_store_refuses_a_put_that_only_pinned_tensors_could_make_room_for():
    store = TensorStore(max_bytes=1600, metrics=Metrics())
    a = _put(store, np.zeros(100))
    store.pin([a], lambda: True)
    b = _put(store, np.ones(100))
    with pytest.raises(LimitError, match="pinned"):
        _put(store, np.full(150, 2.0))
    assert store.missing([a, b]) == []  # nothing was evicted for a put that could not fit anyway


def test_resolve_checks_the_stated_type():
    store = TensorStore(max_bytes=MiB, metrics=Metrics())
    tid = _put(store, np.arange(4.0))
    t = graph_pb2.Tensor(ref=tid)
    np.testing.assert_array_equal(store.resolve(t, "input 'x'"), np.arange(4.0))  # no type stated: taken as stored
    with pytest.raises(ValueError, match="read-only"):
        store.resolve(t, "input 'x'")[0] = 1.0
    t.dtype, t.shape[:] = graph_pb2.FLOAT32, [4]
    with pytest.raises(ShapeError, match="the request says f32"):
        store.resolve(t, "input 'x'")


def test_refs_in_finds_references_in_every_tensor_field():
    req = pb.BatchGradientRequest(graph_id="g")
    item = req.items.add()
    item.inputs["x"].ref = "a" * 64
    item.seeds["out"].ref = "b" * 64
    item.inputs["y"].data = b"\0" * 8
    assert refs_in(req) == {"a" * 64, "b" * 64}
    spec = pb.SubmitJobRequest()
    spec.spec.params0["w"].ref = "c" * 64
    spec.spec.args["X"].ref = "d" * 64
    assert refs_in(spec) == {"c" * 64, "d" * 64}


def test_assembler_limits_allocate_nothing_before_validating():
    asm = wire.Assembler(Limits(max_elements=100), max_bytes=1000)
    with pytest.raises(LimitError):
        asm.add(chunk_msg(dtype=graph_pb2.FLOAT64, shape=[101]))
    asm = wire.Assembler(Limits(max_elements=1000), max_bytes=1000, limit_name="the bound")
    with pytest.raises(LimitError, match="over the bound of 1000"):
        asm.add(chunk_msg(dtype=graph_pb2.FLOAT64, shape=[126]))
    assert not asm.started


@pytest.mark.parametrize("leaves", [0.5, 1, wire.PARALLEL_LEAVES - 0.5, wire.PARALLEL_LEAVES, wire.PARALLEL_LEAVES + 2.25])
def test_uploads_hash_leaf_by_leaf_to_the_clients_id(leaves):
    """Large uploads hash each complete leaf on the pool while the stream arrives; every size
    (part of a leaf, whole leaves, a ragged last leaf) gives the id the client computes."""
    a = np.random.default_rng(2).integers(0, 1 << 30, int(leaves * wire.LEAF_BYTES) // 4, dtype=np.int32)
    asm = wire.Assembler(hashing=True)
    for c in wire.chunks(a, chunk_bytes=300_001):  # chunk edges fall anywhere within leaves
        asm.add(c)
    b, tid = asm.finish()
    assert tid == wire.tensor_id(a)
    np.testing.assert_array_equal(a, b)


def test_the_id_covers_type_and_every_leaf():
    a = np.zeros(wire.PARALLEL_LEAVES * wire.LEAF_BYTES // 8)
    ids = {wire.tensor_id(a), wire.tensor_id(a.reshape(2, -1)), wire.tensor_id(a.view(np.int64))}
    for i in (0, a.size // 2, a.size - 1):  # a change in any leaf changes the id
        b = a.copy()
        b[i] = 1.0
        ids.add(wire.tensor_id(b))
    assert len(ids) == 6


def test_uploads_in_progress_reserve_the_store_bound():
    store = TensorStore(max_bytes=1000, metrics=Metrics())
    first = wire.chunks(np.zeros(100), 64)  # 800 bytes, left half-sent
    stream = iter(first)
    started = threading.Event()
    box: dict = {}

    def slow():
        yield next(stream)
        started.set()
        box["go"] = threading.Event()
        box["go"].wait(10)
        yield from stream

    t = threading.Thread(target=lambda: box.setdefault("id", store.receive(slow())[0]))
    t.start()
    assert started.wait(10)
    with pytest.raises(LimitError, match="in progress"):
        _put(store, np.zeros(50))  # 400 more bytes than the bound leaves while the first is received
    box["go"].set()
    t.join(10)
    assert box["id"] == wire.tensor_id(np.zeros(100))
    store.release([box["id"]])
    _put(store, np.zeros(50))  # the reservation went with the finished upload
    with pytest.raises(InvalidRequest):
        store.receive(iter([chunk_msg(dtype=graph_pb2.FLOAT64, shape=[100])]))  # a failed upload frees its reservation
    _put(store, np.ones(60))
