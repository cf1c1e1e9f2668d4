"""The asyncio session (`gs.aconnect`, grpc.aio) against a server process.

  - every method gives what the sync session gives for the same call;
  - 100 gradient calls awaited at once on one session, each result its own;
  - the same recoveries: a graph the server lost registered again, a tensor it lost uploaded
    again, UNAVAILABLE retried until a server listens;
  - a deadline, and the errors as the sync session's RemoteError classes; the token option;
  - jobs: submitted, awaited and read as the sync session reads them.

Each test runs its coroutine with `asyncio.run` (a session belongs to the loop it was made in).
"""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest
from numeric import close, tree_close
from service_fixtures import ServerProcess, metric, parse_metrics, scrape

import gradserve as gs
from gradserve import optim
from gradserve import remote as rm
from gradserve_engine.v1 import service_pb2 as pb

rng = np.random.default_rng(11)
W, B, X = rng.standard_normal((6, 4)), rng.standard_normal(4), rng.standard_normal((5, 6))
PARAMS = {"w": W, "b": B}


def loss(params, x):
    return gs.mean(gs.tanh(x @ params["w"] + params["b"]) ** 2)


def with_aux(params, x):
    h = gs.tanh(x @ params["w"] + params["b"])
    return gs.mean(h**2), gs.sum(h, axis=0)


def seed_f(x, y):
    return gs.sum(gs.sin(x) * y)


def heavy(x, w):
    for _ in range(30):  # 30 chained 600x600 matmuls: a few hundred ms on the server
        x = gs.tanh(gs.matmul(x, w))
    return gs.sum(x)


def quadratic(p, target):
    return gs.sum((p - target) ** 2)


def test_values_equal_the_sync_sessions(server, remote):
    graph = gs.trace(seed_f, rng.standard_normal(4), rng.standard_normal(4))
    inputs = {"x": rng.standard_normal(4), "y": rng.standard_normal(4)}
    batch = [{"x": rng.standard_normal(4), "y": rng.standard_normal(4)} for _ in range(3)]

    async def main():
        async with gs.aconnect(server.address, timeout=30) as r:
            gid = await r.register(graph)
            assert gid == remote.register(graph) == graph.id
            tree_close(await r.evaluate(gid, inputs), remote.evaluate(gid, inputs))
            got, want = await r.gradient(graph, inputs, wrt=["x", "y"]), remote.gradient(graph, inputs, wrt=["x", "y"])
            tree_close(got.outputs, want.outputs)
            tree_close(got.grads, want.grads)
            assert list(got.grads) == ["x", "y"]
            for g, w in zip(await r.batch_gradient(gid, batch, wrt=["x"]), remote.batch_gradient(gid, batch, wrt=["x"]),
                            strict=True):
                tree_close(g.grads, w.grads)
            assert gid in {i.graph_id for i in await r.graphs()}

            tree_close(await r.grad(loss)(PARAMS, X), remote.grad(loss)(PARAMS, X))
            tree_close(await r.value_and_grad(loss, argnums=(0, 1))(PARAMS, X),
                       remote.value_and_grad(loss, argnums=(0, 1))(PARAMS, X))
            tree_close(await r.value_and_grad(with_aux, has_aux=True)(PARAMS, X),
                       remote.value_and_grad(with_aux, has_aux=True)(PARAMS, X))

            refs = await r.put({"params": PARAMS, "x": X})
            assert type(refs["x"]) is gs.TensorRef and refs["x"].shape == X.shape
            assert {refs["x"].id, refs["params"]["w"].id} <= {t.ref for t in (await r.tensors()).tensors}
            tree_close(await r.get(refs), {"params": PARAMS, "x": X})
            tree_close(await r.grad(loss)(refs["params"], refs["x"]), remote.grad(loss)(PARAMS, X))
            kept = await r.grad(loss, keep=True)(refs["params"], refs["x"])
            assert type(kept["w"]) is gs.TensorRef
            tree_close(await r.get(kept), remote.grad(loss)(PARAMS, X))
            assert await r.release([refs, kept]) == 5
            assert refs["x"].id not in {t.ref for t in (await r.tensors()).tensors}

            assert await r.delete(gid) is True
            assert gid not in {i.graph_id for i in await r.graphs()}

    asyncio.run(main())


def test_a_hundred_concurrent_gradients(server):
    xs = [rng.standard_normal(8) for _ in range(100)]
    y = rng.standard_normal(8)

    def registrations():
        return metric(parse_metrics(scrape(server.metrics_port)), "gradserve_requests_total", code="OK",
                      method="RegisterGraph")

    before = registrations()

    async def main():
        async with gs.aconnect(server.address, timeout=60) as r:
            g = r.grad(seed_f, argnums=(0, 1))
            return await asyncio.gather(*(g(x, y) for x in xs))

    results = asyncio.run(main())
    assert registrations() == before + 1  # the first calls, all in flight at once, shared one RegisterGraph
    assert len(results) == 100
    for x, (gx, gy) in zip(xs, results, strict=True):  # d/dx sum(sin(x) y) = cos(x) y; d/dy = sin(x)
        close(gx, np.cos(x) * y)
        close(gy, np.sin(x))


def test_what_the_server_lost_comes_back(server, remote, bare):
    async def main():
        async with gs.aconnect(server.address, timeout=30) as r:
            g = r.grad(loss)
            tree_close(await g(PARAMS, X), gs.grad(loss)(PARAMS, X))
            gid = gs.trace(loss, PARAMS, X).id
            assert bare.DeleteGraph(pb.DeleteGraphRequest(graph_id=gid), timeout=10).deleted
            tree_close(await g(PARAMS, X), gs.grad(loss)(PARAMS, X))  # registered again, invisibly
            assert gid in {i.graph_id for i in remote.graphs()}

            ref = await r.put(X)
            bare.ReleaseTensor(pb.ReleaseTensorRequest(refs=[ref.id]), timeout=10)  # the server let go; r holds X
            tree_close(await g(PARAMS, ref), gs.grad(loss)(PARAMS, X))  # uploaded again
            bare.ReleaseTensor(pb.ReleaseTensorRequest(refs=[ref.id]), timeout=10)
            np.testing.assert_array_equal(await r.get(ref), X)  # get uploads it again too
            await r.release(ref)
            with pytest.raises(rm.RemoteNotFound, match=ref.id):  # released here too: nothing to upload again
                await g(PARAMS, ref)

    asyncio.run(main())


def test_unavailable_is_retried_until_a_server_listens_and_tokens(tmp_path):
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    a = ServerProcess()
    a.close()  # its port is free now: calls get UNAVAILABLE
    b = None

    async def main():
        nonlocal b
        async with gs.aconnect(a.address, token="s3cret-token", timeout=30) as r:
            call = asyncio.ensure_future(r.grad(seed_f)(X[0], X[1]))
            await asyncio.sleep(0.3)
            assert not call.done()
            b = await asyncio.to_thread(ServerProcess, "--token-file", str(token_file), port=a.port)
            close(await call, np.cos(X[0]) * X[1])  # retried with backoff until b answered, with the token
        async with gs.aconnect(a.address, token="wrong-token", timeout=10) as r:
            with pytest.raises(rm.RemoteUnauthenticated, match="token"):
                await r.graphs()

    try:
        asyncio.run(main())
    finally:
        if b is not None:
            b.close()


def test_deadline_and_errors_are_the_sync_sessions(server, remote):
    mx, mw = rng.standard_normal((600, 600)) * 0.01, rng.standard_normal((600, 600)) * 0.01
    gid = remote.register(gs.trace(heavy, mx, mw))

    async def main():
        async with gs.aconnect(server.address, timeout=0.05) as hurried:
            start = time.monotonic()
            with pytest.raises(rm.RemoteDeadlineExceeded) as info:
                await hurried.evaluate(gid, {"x": mx, "w": mw})
            assert time.monotonic() - start < 2.0 and info.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        async with gs.aconnect(server.address, timeout=30) as r:
            for call in (lambda s: s.evaluate("0" * 64, {"x": 1.0}), lambda s: s.graph("0" * 64),
                         lambda s: s.gradient(gid, {"x": mx}, wrt=["x"]),  # an input missing
                         lambda s: s.job("no-such-job")):
                with pytest.raises(rm.RemoteError) as sync_error:
                    call(remote)
                with pytest.raises(rm.RemoteError) as async_error:
                    await call(r)
                assert type(async_error.value) is type(sync_error.value) is not rm.RemoteError
                assert str(async_error.value) == str(sync_error.value)

    asyncio.run(main())


def test_jobs_are_awaited(server, remote):
    target = rng.standard_normal(3)

    async def main():
        async with gs.aconnect(server.address, timeout=30) as r:
            job = await r.minimize(quadratic, np.zeros(3), args=(target,), optimizer=optim.LBFGS(), steps=50)
            assert repr(job) == f"Job({job.id!r})"  # no call made yet: nothing seen
            assert await (await job.wait(timeout=30)).status() == "succeeded"
            res = await job.result()
            assert job.id in {j.id for j in await r.jobs()}
            return job.id, res, await job.history()

    job_id, res, history = asyncio.run(main())
    np.testing.assert_allclose(res.x, target, atol=1e-6)  # the minimum of sum((p - target)^2)
    want = remote.job(job_id)
    want.wait(timeout=30)
    same = want.result()
    close(res.x, same.x["p"])  # a reattached job knows no params0: its x is by input name
    assert (res.nit, res.nfev, res.status, res.success, res.message) == \
        (same.nit, same.nfev, same.status, same.success, same.message)
    assert history == want.history()
    assert remote.delete_job(job_id)
