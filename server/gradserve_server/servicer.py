"""GradientService: each RPC decodes, calls the engine (a Backend), encodes (route_guide style).

Requests arrive as raw bytes and are parsed here, so bytes that do not parse are answered
INVALID_ARGUMENT (grpcio's own deserialiser would answer INTERNAL). Errors become status codes
in one place, `_classify`: an error of the family in gradserve_engine.errors by the status its
class names; anything else is a bug, answered INTERNAL with its traceback logged. There is no
business logic in this layer.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError, Message

from gradserve_engine.backend import Backend
from gradserve_engine.engine import Residuals
from gradserve_engine.errors import Cancelled, GradserveError, InvalidRequest, LimitError, NotFound, TensorNotFound
from gradserve_engine.guard import Budget, mib, stop_when, within
from gradserve_engine.ir import Graph, Input, Limits, tensor_from_proto, tensor_to_proto, type_str
from gradserve_engine.ops.core import FLOATS, NP_DTYPES, dtype_name
from gradserve_engine.v1 import graph_pb2
from gradserve_engine.v1 import service_pb2 as pb
from gradserve_engine.wire import MISSING_KEY, PB_DTYPE

from . import bounds
from .jobs import FINISHED, JobManager
from .metrics import Metrics
from .registry import GraphRegistry, ResidualStore, Summary
from .tensors import MAX_MISSING_LISTED, TensorStore, chunk_size, refs_in

log = logging.getLogger("gradserve.servicer")
SERVICE = "gradserve.v1.GradientService"


MAX_MESSAGE = 2000  # characters of an error message: it travels in the trailers, whose size is limited


def _status(e: BaseException, context: grpc.ServicerContext) -> tuple[grpc.StatusCode, str]:
    code, message = _classify(e, context)
    if len(message) > MAX_MESSAGE:
        message = message[:MAX_MESSAGE] + f"... (message cut from {len(message)} characters)"
    return code, message


def _classify(e: BaseException, context: grpc.ServicerContext) -> tuple[grpc.StatusCode, str]:
    if isinstance(e, Cancelled):
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:  # stopped because the deadline passed
            return grpc.StatusCode.DEADLINE_EXCEEDED, f"deadline exceeded: {e}"
        return grpc.StatusCode[e.code], f"cancelled: {e}"
    if isinstance(e, GradserveError):
        return grpc.StatusCode[e.code], str(e)
    if isinstance(e, MemoryError):  # what a call needed was not there: the caller's call is too big for now
        log.warning("out of memory in a call: %r", e)
        return grpc.StatusCode.RESOURCE_EXHAUSTED, f"out of memory: {type(e).__name__}: {e}"
    log.exception("internal error")  # not the caller's mistake: a bug, with its traceback in the log
    return grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}: {e}"


def _parse(request_cls: type[Message], raw: bytes) -> Any:
    try:
        return request_cls.FromString(raw)
    except DecodeError as e:
        raise InvalidRequest(f"request bytes do not parse as {request_cls.__name__}: {e}") from None


class Servicer:
    """The RPC handlers over a Backend, a GraphRegistry and a ResidualStore."""

    max_response_bytes: int | None = None  # the server's send limit: a larger answer is RESOURCE_EXHAUSTED here

    def __init__(self, engine: Backend, registry: GraphRegistry, residuals: ResidualStore,
                 limits: Limits, metrics: Metrics, max_concurrent: int = 64, jobs: JobManager | None = None,
                 tensors: TensorStore | None = None, max_message_bytes: int = 256 << 20):
        self.engine, self.registry, self.residuals, self.jobs = engine, registry, residuals, jobs
        self.limits, self.metrics = limits, metrics
        self.tensors = tensors if tensors is not None else TensorStore(1 << 30, limits=limits, metrics=metrics)
        self.max_message_bytes = max_message_bytes
        self.budget = Budget(limits.max_call_bytes, limits.max_inflight_bytes, limits.max_elements)
        self.max_concurrent = max_concurrent
        metrics.gauge_fn("gradserve_inflight_requests", lambda: self._inflight)
        metrics.gauge_fn("gradserve_plan_cache_hits_total", lambda: engine.cache_info().hits)
        metrics.gauge_fn("gradserve_plan_cache_misses_total", lambda: engine.cache_info().misses)
        metrics.gauge_fn("gradserve_plan_cache_bytes", lambda: engine.cache_info().nbytes)
        self._inflight = 0
        self._draining = False
        self._idle = threading.Condition()

    def drain(self, timeout: float) -> bool:
        """Refuse new calls with UNAVAILABLE from now on; wait up to `timeout` seconds for the
        calls in flight to finish. Returns whether they all did."""
        with self._idle:
            self._draining = True
            return self._idle.wait_for(lambda: self._inflight == 0, timeout)

    def _admit(self) -> tuple[grpc.StatusCode, str] | None:
        with self._idle:
            if self._draining:
                return grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another replica or later"
            if self._inflight >= self.max_concurrent:
                return (grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"the server is at its limit of {self.max_concurrent} concurrent calls; retry later")
            self._inflight += 1
            return None

    def _leave(self) -> None:
        with self._idle:
            self._inflight -= 1
            if self._inflight == 0:
                self._idle.notify_all()

    # ---- decoding helpers
    def _tensors(self, fields: Mapping[str, graph_pb2.Tensor], what: str) -> dict[str, np.ndarray]:
        """A map of request tensors as arrays: data decoded, references resolved in the tensor store."""
        return {name: self.tensors.resolve(t, f"{what} {name!r}") if t.ref else
                tensor_from_proto(t, self.limits, f"{what} {name!r}") for name, t in fields.items()}

    def _encode(self, values: Mapping[str, Any], field: Any, keep: bool = False) -> None:
        """Results into a response map: their bytes, or with `keep` a reference to each, stored here."""
        for name, v in values.items():
            if keep:
                tid, a = self.tensors.keep(v)
                t = field[name]
                t.ref, t.dtype, t.shape[:] = tid, PB_DTYPE[dtype_name(a.dtype)], a.shape
            else:
                tensor_to_proto(np.asarray(v), field[name])

    def _embed_refs(self, fields: Mapping[str, graph_pb2.Tensor], what: str) -> list[str]:
        """Replace each reference of a map by the stored tensor's bytes (a job keeps its values
        with it, so it resumes after a restart whatever the store then holds); returns the refs."""
        refs = []
        for name, t in fields.items():
            if t.ref:
                a = self.tensors.resolve(t, f"{what} {name!r}")
                refs.append(t.ref)
                t.ClearField("ref")
                tensor_to_proto(a, t)
        return refs

    # ---- what a response will hold, known from the graph before anything is computed
    def _will_send(self, parts: Iterable[tuple[str, str, tuple[int, ...]]], times: int = 1, keep: bool = False) -> None:
        """LimitError, before computing, when the tensors a response will carry ((what, dtype,
        shape) each, `times` over) are larger together than the message limit. Results kept in
        the tensor store (`keep`) travel as references, so they are not counted."""
        limit = self.limits.max_message_bytes
        if limit is None or keep:
            return
        total, largest, biggest = 0, 0, ""
        for what, dtype, shape in parts:
            n = math.prod(shape) * NP_DTYPES[dtype].itemsize
            total += n
            if n >= largest:
                largest, biggest = n, f"{what} is {type_str(dtype, shape)}, {mib(n)}"
        if total * times > limit:
            each = f" for each of {times} input sets" if times > 1 else ""
            raise LimitError(f"the response would carry {mib(total * times)} of tensors ({biggest}{each}), over the "
                             f"message limit of {mib(limit)} (--max-message-mib); nothing was computed")

    @staticmethod
    def _outputs(graph: Graph, names: Iterable[str] | None = None) -> list[tuple[str, str, tuple[int, ...]]]:
        ids = dict(graph.outputs)
        names = graph.output_names() if names is None else names
        return [(f"output {o!r}", *graph.aval(ids[o])) for o in names if o in ids]

    @staticmethod
    def _known_inputs(graph: Graph, names: Iterable[str]) -> list[Input]:
        """The inputs of `graph` among `names` (the engine refuses the others)."""
        known = set(graph.input_names())
        return [graph.input(x) for x in names if x in known]

    def _inputs(self, graph: Graph, names: Iterable[str], what: str, lead: tuple[int, ...] = ()) -> list[tuple[str, str, tuple]]:
        return [(f"{what} {x.name!r}", x.dtype, lead + x.shape) for x in self._known_inputs(graph, names)]

    def _gradient_parts(self, graph: Graph, wrt: Iterable[str]) -> list[tuple[str, str, tuple[int, ...]]]:
        return self._outputs(graph) + self._inputs(graph, wrt, "gradient for")

    # ---- RPCs
    def RegisterGraph(self, req: pb.RegisterGraphRequest, context) -> pb.RegisterGraphResponse:
        graph = Graph.from_proto(req.graph, self.limits)
        gid, created = self.registry.register(graph, req.graph.SerializeToString(deterministic=True))
        return pb.RegisterGraphResponse(graph_id=gid, created=created)

    def Evaluate(self, req: pb.EvaluateRequest, context) -> pb.EvaluateResponse:
        graph = self.registry.get(req.graph_id)
        self._will_send(self._outputs(graph, list(req.outputs) or None), keep=req.keep)
        outs = self.engine.evaluate(graph, self._tensors(req.inputs, "input"), list(req.outputs) or None)
        resp = pb.EvaluateResponse()
        self._encode(outs, resp.outputs, req.keep)
        return resp

    def Gradient(self, req: pb.GradientRequest, context) -> pb.GradientResponse:
        graph = self.registry.get(req.graph_id)
        self._will_send(self._gradient_parts(graph, req.wrt), keep=req.keep)
        outs, grads = self.engine.vjp(graph, self._tensors(req.inputs, "input"), list(req.wrt),
                                      seeds=self._tensors(req.seeds, "seed") or None, outputs=list(req.outputs) or None,
                                      batch_axes=dict(req.batch_axes) or None, content_ids=_refs(req.inputs))
        return self._gradient_response(outs, grads, req.keep)

    def _gradient_response(self, outs: Mapping[str, Any], grads: Mapping[str, Any], keep: bool = False) -> pb.GradientResponse:
        resp = pb.GradientResponse()
        self._encode(outs, resp.outputs)
        self._encode(grads, resp.grads, keep)
        return resp

    def Jvp(self, req: pb.JvpRequest, context) -> pb.JvpResponse:
        graph = self.registry.get(req.graph_id)
        outputs = self._outputs(graph)
        self._will_send(outputs + [("tangent of " + what, dtype, shape) for what, dtype, shape in outputs if dtype in FLOATS])
        outs, tangents = self.engine.jvp(graph, self._tensors(req.inputs, "input"), self._tensors(req.tangents, "tangent"))
        resp = pb.JvpResponse()
        self._encode(outs, resp.outputs)
        self._encode(tangents, resp.tangents)
        return resp

    def BatchGradient(self, req: pb.BatchGradientRequest, context) -> pb.BatchGradientResponse:
        graph = self.registry.get(req.graph_id)
        self._will_send(self._gradient_parts(graph, req.wrt), times=len(req.items), keep=req.keep)
        items = [(self._tensors(item.inputs, "input"), self._tensors(item.seeds, "seed") or None) for item in req.items]
        results = self.engine.batch_vjp(graph, items, list(req.wrt), list(req.outputs) or None,
                                        content_ids=[_refs(item.inputs) for item in req.items])
        resp = pb.BatchGradientResponse()
        resp.results.extend(self._gradient_response(outs, grads, req.keep) for outs, grads in results)
        return resp

    def Jacobian(self, req: pb.JacobianRequest, context) -> pb.JacobianResponse:
        graph = self.registry.get(req.graph_id)
        wrt = self._known_inputs(graph, req.wrt)
        self._will_send((f"the Jacobian of {what} by input {x.name!r}", x.dtype, shape + x.shape)
                        for what, _, shape in self._outputs(graph, list(req.outputs) or None) for x in wrt)
        jac = self.engine.jacobian(graph, self._tensors(req.inputs, "input"), list(req.wrt), list(req.outputs) or None)
        resp = pb.JacobianResponse()
        for (o, x), value in jac.items():
            resp.entries.add(output=o, input=x, value=tensor_to_proto(np.asarray(value)))
        return resp

    def Hessian(self, req: pb.HessianRequest, context) -> pb.HessianResponse:
        graph = self.registry.get(req.graph_id)
        wrt = self._known_inputs(graph, req.wrt)
        if req.vectors:
            self._will_send((f"the Hessian-vector product for input {x.name!r}", x.dtype, x.shape) for x in wrt)
        else:
            self._will_send((f"the Hessian block of inputs {xi.name!r} and {xj.name!r}", xj.dtype, xi.shape + xj.shape)
                            for xi in wrt for xj in wrt)
        inputs = self._tensors(req.inputs, "input")
        resp = pb.HessianResponse()
        if req.vectors:
            hv = self.engine.hvp(graph, inputs, list(req.wrt), req.output, self._tensors(req.vectors, "vector"))
            for x, value in hv.items():
                resp.entries.add(output="hvp", input=x, value=tensor_to_proto(np.asarray(value)))
        else:
            for (xi, xj), value in self.engine.hessian(graph, inputs, list(req.wrt), req.output).items():
                resp.entries.add(output=xi, input=xj, value=tensor_to_proto(np.asarray(value)))
        return resp

    def ListGraphs(self, req: pb.ListGraphsRequest, context) -> pb.ListGraphsResponse:
        key = bounds.after("graphs", req.page_token, (str,))
        page, more = self.registry.list(key[0] if key else None, bounds.page_size(req.page_size))
        resp = pb.ListGraphsResponse(graphs=[_graph_info(gid, s) for gid, s in page])
        if more:
            resp.next_page_token = bounds.next_token("graphs", (page[-1][0],))
        return resp

    def GetGraph(self, req: pb.GetGraphRequest, context) -> pb.GetGraphResponse:
        graph, summary = self.registry.describe(req.graph_id)
        resp = pb.GetGraphResponse(info=_graph_info(req.graph_id, summary))
        for x in graph.inputs:
            resp.inputs.add(name=x.name, dtype=PB_DTYPE[x.dtype], shape=x.shape)
        for name, vid in graph.outputs:
            dtype, shape = graph.aval(vid)
            resp.outputs.add(name=name, dtype=PB_DTYPE[dtype], shape=shape)
        return resp

    def DeleteGraph(self, req: pb.DeleteGraphRequest, context) -> pb.DeleteGraphResponse:
        deleted = self.registry.delete(req.graph_id)
        self.engine.forget(req.graph_id)  # its plans go with it
        return pb.DeleteGraphResponse(deleted=deleted)

    def OpenVjp(self, req: pb.OpenVjpRequest, context) -> pb.OpenVjpResponse:
        graph = self.registry.get(req.graph_id)
        self._will_send(self._outputs(graph))
        outs, kept = self.engine.open_vjp(graph, self._tensors(req.inputs, "input"), list(req.wrt), list(req.outputs) or None)
        handle, ttl = self.residuals.open(kept, req.ttl_seconds)
        self.tensors.pin([t.ref for t in req.inputs.values() if t.ref], lambda: self.residuals.alive(handle))
        resp = pb.OpenVjpResponse(handle=handle, ttl_seconds=ttl, residual_bytes=kept.nbytes)
        self._encode(outs, resp.outputs)
        return resp

    def CallVjp(self, req: pb.CallVjpRequest, context) -> pb.CallVjpResponse:
        kept = self.residuals.get(req.handle)
        cotangents = self._tensors(req.cotangents, "cotangent")
        self._will_send(self._call_vjp_parts(kept, cotangents, req.batched), keep=req.keep)
        grads = self.engine.call_vjp(kept, cotangents, batched=req.batched)
        resp = pb.CallVjpResponse()
        self._encode(grads, resp.grads, req.keep)
        return resp

    def _call_vjp_parts(self, kept: Residuals, cotangents: Mapping[str, np.ndarray],
                        batched: bool) -> list[tuple[str, str, tuple[int, ...]]]:
        lead = next((c.shape[:1] for c in cotangents.values() if c.ndim), ()) if batched else ()
        return self._inputs(kept.graph, kept.wrt, "gradient for", lead)

    def CloseVjp(self, req: pb.CloseVjpRequest, context) -> pb.CloseVjpResponse:
        return pb.CloseVjpResponse(closed=self.residuals.close(req.handle))

    # ---- jobs
    def _jobs(self) -> JobManager:
        if self.jobs is None:
            raise NotFound("this server runs no jobs")
        return self.jobs

    def SubmitJob(self, req: pb.SubmitJobRequest, context) -> pb.SubmitJobResponse:
        jobs = self._jobs()
        refs = self._embed_refs(req.spec.params0, "params0") + self._embed_refs(req.spec.args, "args")
        job = jobs.submit(req.spec)
        if refs:  # the job holds their values; the stored tensors stay for the caller's next calls while it runs
            self.tensors.pin(refs, lambda: _job_running(jobs, job.job_id))
        return pb.SubmitJobResponse(job=job)

    def GetJob(self, req: pb.GetJobRequest, context) -> pb.GetJobResponse:
        job, fun = self._jobs().get(req.job_id)
        resp = pb.GetJobResponse(job=job, fun=fun)
        if req.with_params:
            params, jac, counts = self._jobs().params(req.job_id)
            self._encode(params, resp.params)
            self._encode(jac, resp.jac)
            resp.counts.nit, resp.counts.nfev = counts.get("nit", 0), counts.get("nfev", 0)
            if "status" in counts:
                resp.counts.status = counts["status"]
        if req.with_history:
            loss, gnorm = self._jobs().history(req.job_id)
            resp.loss.extend(loss)
            resp.grad_norm.extend(gnorm)
        return resp

    def WatchJob(self, req: pb.WatchJobRequest, context) -> Iterator[pb.JobEvent]:
        yield from self._jobs().watch(req.job_id, req.from_step, context.is_active)

    def CancelJob(self, req: pb.CancelJobRequest, context) -> pb.CancelJobResponse:
        return pb.CancelJobResponse(job=self._jobs().cancel(req.job_id))

    def DeleteJob(self, req: pb.DeleteJobRequest, context) -> pb.DeleteJobResponse:
        return pb.DeleteJobResponse(deleted=self._jobs().delete(req.job_id))

    def ListJobs(self, req: pb.ListJobsRequest, context) -> pb.ListJobsResponse:
        key = bounds.after("jobs", req.page_token, (float, str))
        jobs, more = self._jobs().list(key, bounds.page_size(req.page_size))
        resp = pb.ListJobsResponse(jobs=jobs)
        if more:
            resp.next_page_token = bounds.next_token("jobs", (jobs[-1].created, jobs[-1].job_id))
        return resp

    # ---- the tensor store
    def PutTensor(self, chunks: Iterator[bytes], context) -> pb.PutTensorResponse:
        tid, array, created = self.tensors.receive(chunks)
        return pb.PutTensorResponse(tensor=self.tensors.info(tid, array), created=created)

    def GetTensor(self, req: pb.GetTensorRequest, context) -> Iterator[bytes]:
        return self.tensors.stream(req.ref, chunk_size(req.chunk_bytes, self.max_message_bytes))

    def ReleaseTensor(self, req: pb.ReleaseTensorRequest, context) -> pb.ReleaseTensorResponse:
        return pb.ReleaseTensorResponse(released=self.tensors.release(req.refs))

    def ListTensors(self, req: pb.ListTensorsRequest, context) -> pb.ListTensorsResponse:
        key = bounds.after("tensors", req.page_token, (str,))
        resp, more = self.tensors.list(key[0] if key else None, bounds.page_size(req.page_size))
        if more:
            resp.next_page_token = bounds.next_token("tensors", (resp.tensors[-1].ref,))
        return resp

    # ---- wiring
    def handler(self) -> grpc.GenericRpcHandler:
        """The service's method handlers: raw bytes in (parsed in `_wrap`), messages out."""
        methods = {}
        for name, method in pb.DESCRIPTOR.services_by_name["GradientService"].methods_by_name.items():
            request_cls = getattr(pb, method.input_type.name)
            if method.client_streaming:  # PutTensor: raw chunks, parsed in place by the tensor store
                methods[name] = grpc.stream_unary_rpc_method_handler(
                    self._wrap_upload(name, getattr(self, name)), request_deserializer=None,
                    response_serializer=self._serialize)
                continue
            if method.server_streaming:
                methods[name] = grpc.unary_stream_rpc_method_handler(
                    self._wrap_stream(name, request_cls, getattr(self, name)), request_deserializer=None,
                    response_serializer=self._serialize)
            else:  # the handler serialises (a failure, MemoryError included, gets its status code there)
                methods[name] = grpc.unary_unary_rpc_method_handler(
                    self._wrap(name, request_cls, getattr(self, name)), request_deserializer=None,
                    response_serializer=None)
        return grpc.method_handlers_generic_handler(SERVICE, methods)

    def _serialize(self, m: Message | bytes) -> bytes:
        """A response (or a chunk already encoded) as bytes, counted."""
        data = m if isinstance(m, bytes) else m.SerializeToString()
        self.metrics.inc("gradserve_bytes_total", len(data), path="client_server", direction="out")
        return data

    def _answer(self, response: Message) -> bytes:
        """A unary answer as bytes, within the server's message limit, counted. Encoded once:
        upb's ByteSize() would encode the whole answer a second time to measure it."""
        data = response.SerializeToString()
        if self.max_response_bytes is not None and len(data) > self.max_response_bytes:
            raise LimitError(f"the answer is {len(data)} bytes, over the server's message limit of "
                             f"{self.max_response_bytes} bytes")
        return self._serialize(data)

    def _count_in(self, n: int) -> None:
        self.metrics.inc("gradserve_bytes_total", n, path="client_server", direction="in")

    def _missing_refs(self, e: BaseException, request: Any, context: grpc.ServicerContext) -> None:
        """On an unknown tensor reference, name every missing one of the request in the trailers,
        so the client uploads them all before it retries."""
        if not isinstance(e, TensorNotFound):
            return
        missing = self.tensors.missing(refs_in(request)) if request is not None else []
        missing = missing or list(e.refs)
        context.set_trailing_metadata(((MISSING_KEY, ",".join(missing[:MAX_MISSING_LISTED])),))

    def _wrap_stream(self, name: str, request_cls: type, fn: Callable) -> Callable:
        """A server stream: parsed and mapped to status codes like the unary calls. A watcher
        (WatchJob) holds no admission slot: it waits, it does not compute; a download
        (GetTensor) moves bulk bytes and holds one."""
        admit = name == "GetTensor"

        def handle(raw: bytes, context: grpc.ServicerContext):
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            self._count_in(len(raw))
            if admit:
                refused = self._admit()
                if refused is not None:
                    self.metrics.observe_request(name, refused[0].name, 0.0)
                    context.abort(*refused)
            try:
                yield from fn(_parse(request_cls, raw), context)
            except Exception as e:
                code, message = _status(e, context)
                context.abort(code, message)
            finally:
                if admit:
                    self._leave()
                self.metrics.observe_request(name, code.name, time.perf_counter() - start if admit else 0.0)

        return handle

    def _wrap_upload(self, name: str, fn: Callable) -> Callable:
        """A client stream (PutTensor): admitted and mapped to status codes like a unary call;
        each chunk's bytes are counted as they arrive."""
        def handle(raw_chunks: Iterator[bytes], context: grpc.ServicerContext):
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            refused = self._admit()
            if refused is not None:
                self.metrics.observe_request(name, refused[0].name, time.perf_counter() - start)
                context.abort(*refused)

            def counted() -> Iterator[bytes]:
                for raw in raw_chunks:
                    self._count_in(len(raw))
                    yield raw

            try:
                return fn(counted(), context)
            except Exception as e:
                code, message = _status(e, context)
                context.abort(code, message)
            finally:
                self._leave()
                self.metrics.observe_request(name, code.name, time.perf_counter() - start)

        return handle

    def _wrap(self, name: str, request_cls: type, fn: Callable) -> Callable:
        def handle(raw: bytes, context: grpc.ServicerContext):
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            self._count_in(len(raw))
            refused = self._admit()
            if refused is not None:
                self.metrics.observe_request(name, refused[0].name, time.perf_counter() - start)
                context.abort(*refused)
            request = None
            try:
                request = _parse(request_cls, raw)
                with stop_when(lambda: not context.is_active()), within(self.budget):
                    response = fn(request, context)
                return self._answer(response)
            except Exception as e:
                code, message = _status(e, context)
                self._missing_refs(e, request, context)
                context.abort(code, message)
            finally:
                self._leave()
                self.metrics.observe_request(name, code.name, time.perf_counter() - start)

        return handle


def _graph_info(gid: str, s: Summary) -> pb.GraphInfo:
    return pb.GraphInfo(graph_id=gid, nodes=s.nodes, bytes=s.nbytes, input_count=s.inputs, output_count=s.outputs)


def _refs(fields: Mapping[str, graph_pb2.Tensor]) -> dict[str, str]:
    """The inputs given as references to the tensor store, by their content id."""
    return {name: t.ref for name, t in fields.items() if t.ref}


def _job_running(jobs: JobManager, job_id: str) -> bool:
    try:
        return jobs.get(job_id)[0].status not in FINISHED
    except NotFound:
        return False
