"""GradientService: each RPC decodes, calls the engine (a Backend), encodes (route_guide style).

Requests arrive as raw bytes and are parsed here, so bytes that do not parse are answered
INVALID_ARGUMENT (grpcio's own deserialiser would answer INTERNAL). Errors become status codes
in one place, `_classify`: an error of the family in gradserve_engine.errors by the status its
class names; anything else is a bug, answered INTERNAL with its traceback logged. There is no
business logic in this layer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import grpc
import numpy as np
from google.protobuf.message import DecodeError, Message

from gradserve_engine.backend import Backend
from gradserve_engine.errors import Cancelled, GradserveError, InvalidRequest, LimitError, NotFound
from gradserve_engine.ir import Graph, Limits, tensor_from_proto, tensor_to_proto
from gradserve_engine.plan import stop_when
from gradserve_engine.v1 import graph_pb2
from gradserve_engine.v1 import service_pb2 as pb

from .jobs import JobManager
from .metrics import Metrics
from .registry import GraphRegistry, ResidualStore

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
                 limits: Limits, metrics: Metrics, max_concurrent: int = 64, jobs: JobManager | None = None):
        self.engine, self.registry, self.residuals, self.jobs = engine, registry, residuals, jobs
        self.limits, self.metrics = limits, metrics
        self.max_concurrent = max_concurrent
        metrics.gauge_fn("gradserve_inflight_requests", lambda: self._inflight)
        metrics.gauge_fn("gradserve_plan_cache_hits_total", lambda: engine.cache_info().hits)
        metrics.gauge_fn("gradserve_plan_cache_misses_total", lambda: engine.cache_info().misses)
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
        return {name: tensor_from_proto(t, self.limits, f"{what} {name!r}") for name, t in fields.items()}

    @staticmethod
    def _encode(values: Mapping[str, Any], field: Any) -> None:
        for name, v in values.items():
            tensor_to_proto(np.asarray(v), field[name])

    # ---- RPCs
    def RegisterGraph(self, req: pb.RegisterGraphRequest, context) -> pb.RegisterGraphResponse:
        graph = Graph.from_proto(req.graph, self.limits)
        gid, created = self.registry.register(graph, req.graph.SerializeToString(deterministic=True))
        return pb.RegisterGraphResponse(graph_id=gid, created=created)

    def Evaluate(self, req: pb.EvaluateRequest, context) -> pb.EvaluateResponse:
        graph = self.registry.get(req.graph_id)
        outs = self.engine.evaluate(graph, self._tensors(req.inputs, "input"), list(req.outputs) or None)
        resp = pb.EvaluateResponse()
        self._encode(outs, resp.outputs)
        return resp

    def Gradient(self, req: pb.GradientRequest, context) -> pb.GradientResponse:
        graph = self.registry.get(req.graph_id)
        outs, grads = self.engine.vjp(graph, self._tensors(req.inputs, "input"), list(req.wrt),
                                      seeds=self._tensors(req.seeds, "seed") or None, outputs=list(req.outputs) or None,
                                      batch_axes=dict(req.batch_axes) or None)
        return self._gradient_response(outs, grads)

    def _gradient_response(self, outs: Mapping[str, Any], grads: Mapping[str, Any]) -> pb.GradientResponse:
        resp = pb.GradientResponse()
        self._encode(outs, resp.outputs)
        self._encode(grads, resp.grads)
        return resp

    def Jvp(self, req: pb.JvpRequest, context) -> pb.JvpResponse:
        graph = self.registry.get(req.graph_id)
        outs, tangents = self.engine.jvp(graph, self._tensors(req.inputs, "input"), self._tensors(req.tangents, "tangent"))
        resp = pb.JvpResponse()
        self._encode(outs, resp.outputs)
        self._encode(tangents, resp.tangents)
        return resp

    def BatchGradient(self, req: pb.BatchGradientRequest, context) -> pb.BatchGradientResponse:
        graph = self.registry.get(req.graph_id)
        items = [(self._tensors(item.inputs, "input"), self._tensors(item.seeds, "seed") or None) for item in req.items]
        results = self.engine.batch_vjp(graph, items, list(req.wrt), list(req.outputs) or None)
        resp = pb.BatchGradientResponse()
        resp.results.extend(self._gradient_response(outs, grads) for outs, grads in results)
        return resp

    def Jacobian(self, req: pb.JacobianRequest, context) -> pb.JacobianResponse:
        graph = self.registry.get(req.graph_id)
        jac = self.engine.jacobian(graph, self._tensors(req.inputs, "input"), list(req.wrt), list(req.outputs) or None)
        resp = pb.JacobianResponse()
        for (o, x), value in jac.items():
            resp.entries.add(output=o, input=x, value=tensor_to_proto(np.asarray(value)))
        return resp

    def Hessian(self, req: pb.HessianRequest, context) -> pb.HessianResponse:
        graph = self.registry.get(req.graph_id)
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
        resp = pb.ListGraphsResponse()
        for gid, graph, nbytes in self.registry.list():
            info = resp.graphs.add(graph_id=gid, outputs=graph.output_names(), nodes=len(graph.nodes), bytes=nbytes)
            info.inputs.extend(graph.to_proto().inputs)
        return resp

    def DeleteGraph(self, req: pb.DeleteGraphRequest, context) -> pb.DeleteGraphResponse:
        return pb.DeleteGraphResponse(deleted=self.registry.delete(req.graph_id))

    def OpenVjp(self, req: pb.OpenVjpRequest, context) -> pb.OpenVjpResponse:
        graph = self.registry.get(req.graph_id)
        outs, kept = self.engine.open_vjp(graph, self._tensors(req.inputs, "input"), list(req.wrt), list(req.outputs) or None)
        handle, ttl = self.residuals.open(kept, req.ttl_seconds)
        resp = pb.OpenVjpResponse(handle=handle, ttl_seconds=ttl, residual_bytes=kept.nbytes)
        self._encode(outs, resp.outputs)
        return resp

    def CallVjp(self, req: pb.CallVjpRequest, context) -> pb.CallVjpResponse:
        kept = self.residuals.get(req.handle)
        grads = self.engine.call_vjp(kept, self._tensors(req.cotangents, "cotangent"), batched=req.batched)
        resp = pb.CallVjpResponse()
        self._encode(grads, resp.grads)
        return resp

    def CloseVjp(self, req: pb.CloseVjpRequest, context) -> pb.CloseVjpResponse:
        return pb.CloseVjpResponse(closed=self.residuals.close(req.handle))

    # ---- jobs
    def _jobs(self) -> JobManager:
        if self.jobs is None:
            raise NotFound("this server runs no jobs")
        return self.jobs

    def SubmitJob(self, req: pb.SubmitJobRequest, context) -> pb.SubmitJobResponse:
        return pb.SubmitJobResponse(job=self._jobs().submit(req.spec))

    def GetJob(self, req: pb.GetJobRequest, context) -> pb.GetJobResponse:
        job, fun = self._jobs().get(req.job_id)
        resp = pb.GetJobResponse(job=job, fun=fun)
        if req.with_params:
            self._encode(self._jobs().params(req.job_id), resp.params)
        if req.with_history:
            loss, gnorm = self._jobs().history(req.job_id)
            resp.loss.extend(loss)
            resp.grad_norm.extend(gnorm)
        return resp

    def WatchJob(self, req: pb.WatchJobRequest, context) -> Iterator[pb.JobEvent]:
        yield from self._jobs().watch(req.job_id, req.from_step, context.is_active)

    def CancelJob(self, req: pb.CancelJobRequest, context) -> pb.CancelJobResponse:
        return pb.CancelJobResponse(job=self._jobs().cancel(req.job_id))

    def ListJobs(self, req: pb.ListJobsRequest, context) -> pb.ListJobsResponse:
        return pb.ListJobsResponse(jobs=self._jobs().list())

    # ---- wiring
    def handler(self) -> grpc.GenericRpcHandler:
        """The service's method handlers: raw bytes in (parsed in `_wrap`), messages out."""
        methods = {}
        for name, method in pb.DESCRIPTOR.services_by_name["GradientService"].methods_by_name.items():
            request_cls = getattr(pb, method.input_type.name)
            make = grpc.unary_stream_rpc_method_handler if method.server_streaming else grpc.unary_unary_rpc_method_handler
            wrap = self._wrap_stream if method.server_streaming else self._wrap
            methods[name] = make(wrap(name, request_cls, getattr(self, name)), request_deserializer=None,
                                 response_serializer=lambda m: m.SerializeToString())
        return grpc.method_handlers_generic_handler(SERVICE, methods)

    def _wrap_stream(self, name: str, request_cls: type, fn: Callable) -> Callable:
        """A server stream: parsed and mapped to status codes like the unary calls; it does not
        hold an admission slot (a watcher waits, it does not compute)."""
        def handle(raw: bytes, context: grpc.ServicerContext):
            code = grpc.StatusCode.OK
            try:
                yield from fn(_parse(request_cls, raw), context)
            except Exception as e:
                code, message = _status(e, context)
                context.abort(code, message)
            finally:
                self.metrics.observe_request(name, code.name, 0.0)

        return handle

    def _wrap(self, name: str, request_cls: type, fn: Callable) -> Callable:
        def handle(raw: bytes, context: grpc.ServicerContext):
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            refused = self._admit()
            if refused is not None:
                self.metrics.observe_request(name, refused[0].name, time.perf_counter() - start)
                context.abort(*refused)
            try:
                request = _parse(request_cls, raw)
                with stop_when(lambda: not context.is_active()):
                    response = fn(request, context)
                if self.max_response_bytes is not None and response.ByteSize() > self.max_response_bytes:
                    raise LimitError(f"the answer is {response.ByteSize()} bytes, over the server's message limit of "
                                     f"{self.max_response_bytes} bytes")
                return response
            except Exception as e:
                code, message = _status(e, context)
                context.abort(code, message)
            finally:
                self._leave()
                self.metrics.observe_request(name, code.name, time.perf_counter() - start)

        return handle
