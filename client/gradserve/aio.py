"""The asyncio session: `gs.aconnect(address)` gives the remote session's methods as awaitables.

Built on grpc.aio, for services that call gradserve from asyncio code: many calls in flight on
one channel, no thread per call. The requests and the results are built and read by the same
functions as the sync session's (`remote.py`), and the same policy holds: a deadline per call,
UNAVAILABLE retried with backoff inside it (`asyncio.sleep`), a graph the server lost registered
again, tensors it lost uploaded again, errors raised as the same `gs.RemoteError` classes.

`grad` and `value_and_grad` trace with the SDK's own machinery (`Functional`) at the call, and
build the request from the values of then; the call returns an awaitable of the result.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from gradserve_engine.ir import Graph
from gradserve_engine.v1 import service_pb2 as pb
from gradserve_engine.v1 import service_pb2_grpc
from gradserve_engine.wire import CHUNK_BYTES, Assembler, chunks

from .api import Functional, unflatten
from .minimize import OptimizeResult
from .pytree import tree_flatten
from .refs import TensorRef
from .remote import (
    _DOWNLOAD_LIMITS,
    FINISHED,
    LIST_PAGE_SIZE,
    POLL_SECONDS,
    GradientResult,
    RemoteDeadlineExceeded,
    _assembled,
    _Attempts,
    _batch_gradient_request,
    _evaluate_request,
    _gradient_request,
    _gradient_result,
    _history,
    _job_repr,
    _job_result,
    _job_spec,
    _merge_pages,
    _remote_error,
    _result_request,
    _SessionState,
    _tensors,
    _time_left,
    _uploads,
)


async def _chunks(a: np.ndarray, chunk_bytes: int) -> AsyncIterator[bytes]:
    """The PutTensor stream of `a`, as grpc.aio's client stream takes it."""
    for raw in chunks(a, chunk_bytes):
        yield raw


def _id(graph: Graph | str) -> str:
    return graph.id if isinstance(graph, Graph) else graph


class AsyncSession(_SessionState):
    """A grpc.aio connection to a gradserve server: the sync `Session`'s methods, awaitable.
    Create it inside a running event loop (its channel belongs to that loop); `async with` closes it."""

    def __init__(self, address: str, token: str | None = None, tls: bool | str | Path | bytes | None = None,
                 timeout: float = 60.0, max_message_bytes: int = 256 << 20, chunk_bytes: int = CHUNK_BYTES):
        super().__init__(address, token, tls, timeout, max_message_bytes, chunk_bytes)
        if self._credentials is not None:
            self._channel = grpc.aio.secure_channel(address, self._credentials, self._options)
        else:
            self._channel = grpc.aio.insecure_channel(address, self._options)
        self._stub = service_pb2_grpc.GradientServiceStub(self._channel)
        self._put, self._get = self._streams(self._channel)
        self._registering: dict[str, asyncio.Future[str]] = {}  # one RegisterGraph in flight per graph
        self._fn = Functional(_AsyncRemoteBackend(self))
        self._fn_keep = Functional(_AsyncRemoteBackend(self, keep=True))

    # ---- lifecycle
    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- transport
    async def _call(self, method: str, request: Any, graph_id: str | None = None, idempotent: bool = True,
                    timeout: float | None = None) -> Any:
        """`Session._call`, awaited: the same deadline, retries and recoveries."""
        attempts = _Attempts(self.timeout if timeout is None else timeout)
        while True:
            try:
                return await getattr(self._stub, method)(request, timeout=attempts.timeout(), metadata=self._metadata)
            except grpc.RpcError as e:
                await self._recover(e, attempts, graph_id, idempotent)

    async def _recover(self, e: grpc.RpcError, attempts: _Attempts, graph_id: str | None = None,
                       idempotent: bool = True, refs: Sequence[str] | None = None) -> None:
        """`Session._recover`, awaited: make the next try possible, or raise `e` as a RemoteError."""
        delay = attempts.backoff(e, idempotent)
        if delay is not None:
            await asyncio.sleep(delay)
            return
        lost = self._lost(e, attempts, refs)
        if lost:
            for r, a in lost:
                await self._upload(a, attempts.remaining(), expect=r)
            return
        graph = self._reregister(e, graph_id, attempts)
        if graph is None:
            raise _remote_error(e) from None
        await self._register(graph, attempts.remaining())

    async def _upload(self, a: np.ndarray, timeout: float | None = None, expect: str | None = None) -> pb.TensorInfo:
        """One PutTensor stream from an async iterator of chunks (retried on UNAVAILABLE)."""
        attempts = _Attempts(self.timeout if timeout is None else timeout)
        while True:
            try:
                resp = await self._put(_chunks(a, self.chunk_bytes), timeout=attempts.timeout(), metadata=self._metadata)
                return self._uploaded(resp.tensor, expect)
            except grpc.RpcError as e:
                delay = attempts.backoff(e)
                if delay is None:
                    raise _remote_error(e) from None
                await asyncio.sleep(delay)

    async def _register(self, graph: Graph, timeout: float | None = None) -> str:
        resp = await self._call("RegisterGraph", pb.RegisterGraphRequest(graph=graph.to_proto()), timeout=timeout)
        return self._registered(graph, resp)

    async def _ensure(self, graph: Graph) -> str:
        """Register `graph` unless this session has; concurrent calls share one RegisterGraph."""
        if graph.id in self._known:
            return graph.id
        pending = self._registering.get(graph.id)
        if pending is None:
            pending = self._registering[graph.id] = asyncio.ensure_future(self._register(graph))
            pending.add_done_callback(lambda _: self._registering.pop(graph.id, None))
        return await asyncio.shield(pending)  # one caller cancelled does not cancel the others' registration

    async def _graph_id(self, graph: Graph | str) -> str:
        return await self._ensure(graph) if isinstance(graph, Graph) else graph

    # ---- tensors held by the server
    async def put(self, tree: Any, hold: bool = True) -> Any:
        """`Session.put`: the arrays of `tree` uploaded (concurrently, each streamed in chunks);
        returns the same tree with a `gs.TensorRef` for each array."""
        leaves, spec, todo = _uploads(tree)
        infos = await asyncio.gather(*(self._upload(a) for _, a in todo))
        for (i, a), info in zip(todo, infos, strict=True):
            leaves[i] = self._hold(a, info, hold)
        return unflatten(spec, leaves)

    async def get(self, refs: Any) -> Any:
        """Download the tensors of a tree of refs (concurrently, each streamed); the same tree of arrays."""
        leaves, spec = tree_flatten(refs)
        got = iter(await asyncio.gather(*(self._download(x) for x in leaves if type(x) is TensorRef)))
        return unflatten(spec, [next(got) if type(x) is TensorRef else x for x in leaves])

    async def release(self, refs: Any) -> int:
        """`Session.release`: let the server drop these tensors and stop holding them here."""
        ids = self._let_go(refs)
        return int((await self._call("ReleaseTensor", pb.ReleaseTensorRequest(refs=ids))).released) if ids else 0

    async def tensors(self) -> pb.ListTensorsResponse:
        """`Session.tensors`: what the server's tensor store holds, every page of it."""
        listing = pb.ListTensorsResponse()
        async for page in self._pages("ListTensors", pb.ListTensorsRequest):
            _merge_pages(listing, page)
        return listing

    async def _pages(self, method: str, request: Callable[..., Any]) -> AsyncIterator[Any]:
        token = ""
        while True:
            page = await self._call(method, request(page_size=LIST_PAGE_SIZE, page_token=token))
            yield page
            token = page.next_page_token
            if not token:
                return

    async def _download(self, ref: TensorRef) -> np.ndarray:
        """One GetTensor stream, read as it comes; a tensor the server lost and this session holds is uploaded again."""
        attempts = _Attempts(self.timeout)
        while True:
            asm = Assembler(_DOWNLOAD_LIMITS, where=f"GetTensor {ref.id}")
            try:
                async for raw in self._get(pb.GetTensorRequest(ref=ref.id, chunk_bytes=self.chunk_bytes),
                                           timeout=attempts.timeout(), metadata=self._metadata):
                    asm.add(raw)
            except grpc.RpcError as e:
                await self._recover(e, attempts, refs=[ref.id])
                continue
            return _assembled(asm)

    # ---- graph-level API
    async def register(self, graph: Graph) -> str:
        """Register `graph` (idempotent); returns its id, the content hash."""
        return await self._register(graph)

    async def evaluate(self, graph: Graph | str, inputs: Mapping[str, Any], outputs: Sequence[str] | None = None,
                       keep: bool = False) -> dict:
        """`Session.evaluate`: the outputs for `inputs` (arrays or TensorRefs)."""
        req = _evaluate_request(_id(graph), self._graph(graph), inputs, outputs, keep)
        gid = await self._graph_id(graph)
        return _tensors((await self._call("Evaluate", req, gid)).outputs)

    async def gradient(self, graph: Graph | str, inputs: Mapping[str, Any], wrt: Sequence[str],
                       seeds: Mapping[str, Any] | None = None, outputs: Sequence[str] | None = None,
                       batch_axes: Mapping[str, int] | None = None, keep: bool = False) -> GradientResult:
        """`Session.gradient`: outputs and gradients."""
        g = self._graph(graph)
        req = _gradient_request(_id(graph), g, inputs, wrt, seeds, outputs, batch_axes, keep)
        gid = await self._graph_id(graph)
        return _gradient_result(await self._call("Gradient", req, gid), g, wrt, outputs)

    async def batch_gradient(self, graph: Graph | str, inputs: Sequence[Mapping[str, Any]], wrt: Sequence[str],
                             seeds: Sequence[Mapping[str, Any]] | None = None,
                             outputs: Sequence[str] | None = None, keep: bool = False) -> list[GradientResult]:
        """`Session.batch_gradient`: one GradientResult per item, in one call."""
        g = self._graph(graph)
        req = _batch_gradient_request(_id(graph), g, inputs, wrt, seeds, outputs, keep)
        gid = await self._graph_id(graph)
        return [_gradient_result(r, g, wrt, outputs) for r in (await self._call("BatchGradient", req, gid)).results]

    async def graphs(self) -> list[pb.GraphInfo]:
        """A summary of every registered graph, by id."""
        return [info async for page in self._pages("ListGraphs", pb.ListGraphsRequest) for info in page.graphs]

    async def graph(self, graph_id: str) -> pb.GetGraphResponse:
        """A registered graph's summary and signature (`Session.graph`)."""
        return await self._call("GetGraph", pb.GetGraphRequest(graph_id=graph_id))

    async def delete(self, graph_id: str) -> bool:
        """Delete a registered graph; False: it was not registered."""
        self._forget(graph_id)
        return (await self._call("DeleteGraph", pb.DeleteGraphRequest(graph_id=graph_id))).deleted

    # ---- the functional API, executed remotely
    def grad(self, f: Callable, argnums: int | Sequence[int] | None = None, has_aux: bool = False,
             batch_axes: Mapping[str, int] | None = None, argnames: str | Sequence[str] | None = None,
             keep: bool = False) -> Callable:
        """`Session.grad` whose function returns an awaitable: `await g(x)`. The call traces
        (once per signature) and builds its request at once, from the values of then."""
        return (self._fn_keep if keep else self._fn).grad(f, argnums, has_aux, batch_axes, argnames)

    def value_and_grad(self, f: Callable, argnums: int | Sequence[int] | None = None, has_aux: bool = False,
                       batch_axes: Mapping[str, int] | None = None, argnames: str | Sequence[str] | None = None,
                       keep: bool = False) -> Callable:
        """`Session.value_and_grad` whose function returns an awaitable of `(value, gradient)`."""
        return (self._fn_keep if keep else self._fn).value_and_grad(f, argnums, has_aux, batch_axes, argnames)

    def trace(self, f: Callable, /, *args: Any, **kwargs: Any) -> Graph:
        return self._fn.trace(f, *args, **kwargs)

    # ---- jobs
    async def minimize(self, fun: Callable, params0: Any, args: tuple = (), optimizer: Any = None, steps: int = 1000,
                       tol: float | None = None, batch_size: int | None = None, seed: int = 0,
                       batch_axes: Mapping[str, int] | None = None, name: str = "",
                       checkpoint_every: int = 0) -> AsyncJob:
        """`Session.minimize`: submit the job; returns its AsyncJob."""
        spec, param_names = _job_spec(self._fn, fun, params0, args, optimizer, steps, tol, batch_size, seed, batch_axes,
                                      name, checkpoint_every)
        job = (await self._call("SubmitJob", pb.SubmitJobRequest(spec=spec), idempotent=False)).job
        return AsyncJob(self, job.job_id, params0, param_names)

    async def job(self, job_id: str) -> AsyncJob:
        """Reattach to a job by id."""
        await self._call("GetJob", pb.GetJobRequest(job_id=job_id))
        return AsyncJob(self, job_id)

    async def jobs(self) -> list[AsyncJob]:
        """Every job on the server, oldest first."""
        return [AsyncJob(self, j.job_id) async for page in self._pages("ListJobs", pb.ListJobsRequest) for j in page.jobs]

    async def delete_job(self, job_id: str) -> bool:
        """Delete a finished job on the server (`Session.delete_job`)."""
        return (await self._call("DeleteJob", pb.DeleteJobRequest(job_id=job_id))).deleted


class AsyncJob:
    """A server-side optimisation job of an AsyncSession: `Job`'s calls, awaitable (no progress
    bar and no plot: `Session.job(id)` has them)."""

    def __init__(self, session: AsyncSession, job_id: str, params_like: Any = None,
                 param_names: Sequence[str] | None = None):
        self.session, self.id = session, job_id
        self._like, self._names = params_like, list(param_names or [])
        self._seen: pb.Job | None = None

    def __repr__(self) -> str:
        return _job_repr(self.id, self._seen)

    async def info(self) -> pb.Job:
        self._seen = (await self.session._call("GetJob", pb.GetJobRequest(job_id=self.id))).job
        return self._seen

    async def status(self) -> str:
        """queued, running, succeeded, failed or cancelled."""
        return (await self.info()).status

    async def wait(self, timeout: float | None = None) -> AsyncJob:
        """Until the job finishes, following its progress stream (GetJob polled, at growing
        intervals, when the server has no room for another stream)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        info = await self.info()
        if info.status in FINISHED:
            return self
        step = info.step
        while True:  # a stream that ends early (a restarting server) is watched again from the last step
            remaining = _time_left(self.id, deadline, timeout)
            try:
                async for event in self.session._stub.WatchJob(pb.WatchJobRequest(job_id=self.id, from_step=step),
                                                               timeout=remaining, metadata=self.session._metadata):
                    step = max(step, event.step)
                    if event.status in FINISHED:
                        return self
            except grpc.RpcError as e:
                if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise RemoteDeadlineExceeded(f"job {self.id} did not finish within {timeout} s", e.code()) from None
                if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:  # the server's watchers are all taken
                    return await self._poll(deadline, timeout)
                if e.code() != grpc.StatusCode.UNAVAILABLE:  # a restarting server: watch again
                    raise _remote_error(e) from None
                await asyncio.sleep(0.2)

    async def _poll(self, deadline: float | None, timeout: float | None) -> AsyncJob:
        delay = POLL_SECONDS[0]
        while True:
            remaining = _time_left(self.id, deadline, timeout)
            call_timeout = self.session.timeout if remaining is None else min(self.session.timeout, remaining)
            info = (await self.session._call("GetJob", pb.GetJobRequest(job_id=self.id), timeout=call_timeout)).job
            if info.status in FINISHED:
                return self
            await asyncio.sleep(delay if remaining is None else min(delay, remaining))
            delay = min(2 * delay, POLL_SECONDS[1])

    async def result(self) -> OptimizeResult:
        """The OptimizeResult, as `Job.result` gives it."""
        resp = await self.session._call("GetJob", _result_request(self.id))
        self._seen = resp.job
        return _job_result(resp, self._like, self._names)

    async def history(self) -> dict[str, list]:
        """The job's kept progress points: `{"step", "loss", "grad_norm"}`."""
        resp = await self.session._call("GetJob", pb.GetJobRequest(job_id=self.id, with_history=True))
        self._seen = resp.job
        return _history(resp)

    async def cancel(self) -> AsyncJob:
        await self.session._call("CancelJob", pb.CancelJobRequest(job_id=self.id))
        return self

    async def delete(self) -> bool:
        """Delete this job on the server once it has finished."""
        return await self.session.delete_job(self.id)


class _AsyncRemoteBackend:
    """The deferred backend of the session's Functional: `vjp_outputs` builds the Gradient (and,
    for outputs past the loss, the Evaluate) request now and returns the awaitable of their results."""

    accepts_refs = True
    deferred = True

    def __init__(self, session: AsyncSession, keep: bool = False):
        self.s, self.keep = session, keep

    def vjp_outputs(self, graph: Graph, inputs: Mapping[str, Any], wrt: Sequence[str], loss: str,
                    others: Sequence[str], batch_axes: Mapping[str, int] | None) -> Any:
        grad_req = _gradient_request(graph.id, graph, inputs, wrt, None, [loss], batch_axes, self.keep)
        eval_req = _evaluate_request(graph.id, graph, inputs, others, False) if others else None
        return self._run(graph, grad_req, eval_req, wrt)

    async def _run(self, graph: Graph, grad_req: pb.GradientRequest, eval_req: pb.EvaluateRequest | None,
                   wrt: Sequence[str]) -> tuple[dict, dict]:
        gid = await self.s._ensure(graph)
        if eval_req is None:
            r = _gradient_result(await self.s._call("Gradient", grad_req, gid), graph, wrt, None)
            return r.outputs, r.grads
        grad_resp, eval_resp = await asyncio.gather(self.s._call("Gradient", grad_req, gid),
                                                    self.s._call("Evaluate", eval_req, gid))
        r = _gradient_result(grad_resp, graph, wrt, None)
        return {**r.outputs, **_tensors(eval_resp.outputs)}, r.grads


def aconnect(address: str, token: str | None = None, tls: bool | str | Path | bytes | None = None,
             timeout: float = 60.0, max_message_bytes: int = 256 << 20, chunk_bytes: int = CHUNK_BYTES) -> AsyncSession:
    """An asyncio session with the server at `address`, with `gs.connect`'s arguments; call it
    inside a running event loop and use it as `async with gs.aconnect(...) as remote:`."""
    return AsyncSession(address, token=token, tls=tls, timeout=timeout, max_message_bytes=max_message_bytes,
                        chunk_bytes=chunk_bytes)
