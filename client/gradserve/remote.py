"""The remote session: `gs.connect(address)` gives the local API, executed by a gradserve server.

Every call builds a request, calls the stub with a deadline, and turns `grpc.RpcError` into the
`gs.RemoteError` family. Traced functions are registered once per input signature; a NOT_FOUND
(evicted, or a server restarted without a store) re-registers and retries once, and idempotent
calls retry UNAVAILABLE with backoff inside their deadline, so a restart is invisible.

Data stays where it is used: `put` uploads arrays once (streamed in chunks) and returns
`TensorRef`s, accepted wherever a call takes an array; `keep=True` leaves results on the server
as refs. The session holds the arrays it put, so when the server lost one (evicted, expired,
restarted) a call that names it uploads it again and retries.

The asyncio session (`aio.py`, `gs.aconnect`) builds its requests, reads its results and
retries with this module's functions and `_SessionState`/`_Attempts`: one policy for both.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from gradserve_engine.engine import conform
from gradserve_engine.errors import GraphError, ShapeError
from gradserve_engine.ir import Graph, Limits, Var, tensor_from_proto, tensor_to_proto
from gradserve_engine.ops.core import FLOATS
from gradserve_engine.v1 import graph_pb2, service_pb2_grpc
from gradserve_engine.v1 import service_pb2 as pb
from gradserve_engine.wire import CHUNK_BYTES, DTYPE_FROM_PB, HEADER_ROOM, MISSING_KEY, Assembler, chunks, contiguous

from . import optim
from .api import Functional, _as_array, _is_array_leaf, _param_names, _slot_value, flatten, shaped_like, unflatten
from .minimize import OptimizeResult, tree_norm
from .pytree import tree_flatten
from .refs import TensorRef

LIST_PAGE_SIZE = 1000  # entries asked per page of a list RPC (the server's largest page)
FINISHED = ("succeeded", "failed", "cancelled")
POLL_SECONDS = 0.05, 1.0  # Job.wait's first and longest wait between GetJob polls

# ---------------------------------------------------------------- errors


class RemoteError(Exception):
    """A call the server answered with an error status; `.code` is the grpc.StatusCode."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)  # the server's message, as it sent it
        if code is not None:
            self.code = code


def _subclass(name: str, code: grpc.StatusCode) -> type[RemoteError]:
    return type(name, (RemoteError,), {"code": code, "__doc__": f"The server answered {code.name}.",
                                       "__module__": __name__})


# Named Remote<status>: distinct from the engine's and the server's own exception classes.
RemoteInvalidArgument = _subclass("RemoteInvalidArgument", grpc.StatusCode.INVALID_ARGUMENT)
RemoteNotFound = _subclass("RemoteNotFound", grpc.StatusCode.NOT_FOUND)
RemoteResourceExhausted = _subclass("RemoteResourceExhausted", grpc.StatusCode.RESOURCE_EXHAUSTED)
RemoteUnauthenticated = _subclass("RemoteUnauthenticated", grpc.StatusCode.UNAUTHENTICATED)
RemotePermissionDenied = _subclass("RemotePermissionDenied", grpc.StatusCode.PERMISSION_DENIED)
RemoteDeadlineExceeded = _subclass("RemoteDeadlineExceeded", grpc.StatusCode.DEADLINE_EXCEEDED)
RemoteCancelled = _subclass("RemoteCancelled", grpc.StatusCode.CANCELLED)
RemoteUnavailable = _subclass("RemoteUnavailable", grpc.StatusCode.UNAVAILABLE)
RemoteInternal = _subclass("RemoteInternal", grpc.StatusCode.INTERNAL)
RemoteFailedPrecondition = _subclass("RemoteFailedPrecondition", grpc.StatusCode.FAILED_PRECONDITION)
_BY_CODE = {c.code: c for c in (RemoteInvalidArgument, RemoteNotFound, RemoteResourceExhausted, RemoteUnauthenticated,
                                 RemotePermissionDenied, RemoteDeadlineExceeded, RemoteCancelled, RemoteUnavailable,
                                 RemoteInternal, RemoteFailedPrecondition)}


def _remote_error(e: grpc.RpcError) -> RemoteError:
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    cls = _BY_CODE.get(code, RemoteError)
    return cls(e.details() if hasattr(e, "details") else str(e), code)


# ---------------------------------------------------------------- results


@dataclass
class GradientResult:
    outputs: dict[str, np.ndarray]
    grads: dict[str, np.ndarray]


def _in_order(values: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """`values` with `names` first, in their order (a protobuf map keeps none), then the rest."""
    out = {n: values[n] for n in names if n in values}
    out.update((k, v) for k, v in values.items() if k not in out)
    return out


def _first_rows(x: Any, n: int) -> Any:
    shape = x.shape if type(x) is TensorRef else np.shape(x)
    if len(shape) == 0 or shape[0] < n:
        raise ValueError(f"batch_size={n} needs every array in args to have at least {n} rows, got shape {shape}")
    if type(x) is TensorRef:  # only traced (for its type): a stand-in of the minibatch's shape
        return TensorRef(x.id, x.dtype, (n, *shape[1:]))
    return np.asarray(x)[:n]


_DOWNLOAD_LIMITS = Limits(max_elements=1 << 62)  # what the server sends is as large as it holds


def _assembled(asm: Assembler) -> np.ndarray:
    a, _ = asm.finish()
    a.flags.writeable = True  # a fresh buffer of the caller's
    return a


def _tensor(t: graph_pb2.Tensor, where: str) -> Any:
    """A response tensor: an array, or a TensorRef where the server kept the result."""
    if t.ref:
        return TensorRef(t.ref, DTYPE_FROM_PB[t.dtype], tuple(t.shape))
    return tensor_from_proto(t, where=where)


def _tensors(field: Mapping[str, Any]) -> dict[str, Any]:
    return {name: _tensor(t, name) for name, t in field.items()}


def _fill_one(msg: graph_pb2.Tensor, v: Any) -> None:
    if type(v) is TensorRef:
        v.to_proto(msg)
    else:
        tensor_to_proto(_as_array(v), msg)


def _fill(field: Any, values: Mapping[str, Any], types: Mapping[str, str] | None = None, what: str = "input") -> None:
    """Encode named values into a request's map; with `types` (name -> the dtype the graph
    declares), each is converted by the engine's own rule first (`gradserve_engine.engine.conform`:
    exact casts and fitting Python scalars convert), so a Python scalar keeps its weak type over
    the wire. A value the rule refuses travels as it is: the server refuses it by the same rule
    (INVALID_ARGUMENT, naming the value and both dtypes)."""
    for name, v in values.items():
        if type(v) is TensorRef:  # the server's stored tensor: its dtype is the server's to check
            _fill_one(field[name], v)
            continue
        dtype = None if types is None else types.get(name)
        a = v = _slot_value(v)
        if dtype is not None and not isinstance(v, Var):
            try:
                a = conform(v, dtype, f"{what} {name!r}")
            except ShapeError:
                a = _as_array(v)
        tensor_to_proto(_as_array(a), field[name])


def _input_types(graph: Graph | None) -> dict[str, str] | None:
    return None if graph is None else {i.name: i.dtype for i in graph.inputs}


def _output_types(graph: Graph | None) -> dict[str, str] | None:
    return None if graph is None else {o: graph.aval(vid)[0] for o, vid in graph.outputs}


def _missing_tensors(e: grpc.RpcError) -> list[str]:
    """The tensor ids a NOT_FOUND names in its trailing metadata (none for other NOT_FOUNDs)."""
    try:
        trailers = e.trailing_metadata() or ()
    except Exception:  # an error raised before the call had trailers
        return []
    for key, value in trailers:
        if key == MISSING_KEY:
            return [r for r in (value.decode() if isinstance(value, bytes) else value).split(",") if r]
    return []


# ---------------------------------------------------------------- what both sessions share

_PUT_TENSOR = "/gradserve.v1.GradientService/PutTensor"
_GET_TENSOR = "/gradserve.v1.GradientService/GetTensor"


class _Attempts:
    """One call's deadline and retry state: UNAVAILABLE is retried with doubling waits (0.02 s
    up to 1 s) while the deadline allows; a graph is registered again at most once, and each
    lost tensor is uploaded again at most once. The sync and the async session loop on it."""

    def __init__(self, timeout: float):
        self.deadline = time.monotonic() + timeout
        self.delay, self.reregistered = 0.02, False
        self.uploaded: set[str] = set()

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def timeout(self) -> float:
        """The deadline of the next try, in seconds from now (gRPC's `timeout=`)."""
        return max(self.remaining(), 0.001)

    def backoff(self, e: grpc.RpcError, idempotent: bool = True) -> float | None:
        """The wait before trying again after `e`, or None: not an UNAVAILABLE this call may retry."""
        if e.code() != grpc.StatusCode.UNAVAILABLE or not idempotent or self.remaining() <= self.delay:
            return None
        delay, self.delay = self.delay, min(self.delay * 2, 1.0)
        return delay


class _SessionState:
    """The options and the state a session keeps, sync or async: the graphs it registered (to
    register again on NOT_FOUND) and the arrays it put (to upload again when the server lost one)."""

    def __init__(self, address: str, token: str | None, tls: bool | str | Path | bytes | None, timeout: float,
                 max_message_bytes: int, chunk_bytes: int):
        self.address, self.timeout = address, timeout
        # bytes of tensor data per streamed message: the default fits the smallest server message limit (1 MiB)
        self.chunk_bytes = max(min(chunk_bytes, max_message_bytes - HEADER_ROOM), 1)
        # a connection of its own (gRPC shares one between channels to the same address by default):
        # sessions are independent clients, and a server run with --processes spreads them over its processes
        self._options = [("grpc.max_receive_message_length", max_message_bytes),
                         ("grpc.max_send_message_length", max_message_bytes), ("grpc.use_local_subchannel_pool", 1)]
        self._credentials = None
        if tls:
            root = None if tls is True else (tls if isinstance(tls, bytes) else Path(tls).read_bytes())
            self._credentials = grpc.ssl_channel_credentials(root_certificates=root)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._known: dict[str, Graph] = {}  # graphs registered through this session, to re-register
        self._held: dict[str, np.ndarray] = {}  # arrays put through this session, by id, to upload again
        self._lock = threading.Lock()

    def _streams(self, channel: Any) -> tuple[Any, Any]:
        """PutTensor and GetTensor on `channel` (grpc's or grpc.aio's): they move raw chunk bytes,
        encoded and parsed by gradserve_engine.wire, not protobuf objects."""
        put = channel.stream_unary(_PUT_TENSOR, request_serializer=None,
                                   response_deserializer=pb.PutTensorResponse.FromString)
        get = channel.unary_stream(_GET_TENSOR, request_serializer=pb.GetTensorRequest.SerializeToString,
                                   response_deserializer=None)
        return put, get

    def _graph(self, graph: Graph | str) -> Graph | None:
        """The graph itself when this session knows it (its input and output dtypes): values are
        converted to them before they are sent. A graph id registered elsewhere is not known:
        values travel as they are, and the server applies the same rule to their dtypes."""
        if isinstance(graph, Graph):
            return graph
        with self._lock:
            return self._known.get(graph)

    def _registered(self, graph: Graph, resp: pb.RegisterGraphResponse) -> str:
        if resp.graph_id != graph.id:
            raise GraphError(f"the server hashed the graph to {resp.graph_id}, the client to {graph.id}")
        with self._lock:
            self._known[graph.id] = graph
        return graph.id

    def _reregister(self, e: grpc.RpcError, graph_id: str | None, attempts: _Attempts) -> Graph | None:
        """The graph to register again after `e`: a NOT_FOUND for a graph this session registered, once per call."""
        if e.code() != grpc.StatusCode.NOT_FOUND or attempts.reregistered or graph_id not in self._known:
            return None
        attempts.reregistered = True
        return self._known[graph_id]

    def _lost(self, e: grpc.RpcError, attempts: _Attempts, refs: Sequence[str] | None = None) -> list[tuple[str, np.ndarray]]:
        """The arrays to upload again after `e`: the tensors a NOT_FOUND names (`refs`, or its
        trailing metadata), each once per call; none when this session does not hold them all."""
        if e.code() != grpc.StatusCode.NOT_FOUND:
            return []
        new = [r for r in (_missing_tensors(e) if refs is None else refs) if r not in attempts.uploaded]
        with self._lock:
            if not new or any(r not in self._held for r in new):
                return []
            attempts.uploaded.update(new)
            return [(r, self._held[r]) for r in new]

    def _uploaded(self, info: pb.TensorInfo, expect: str | None) -> pb.TensorInfo:
        """`info` of an upload, checked when it re-uploads the array held under `expect`."""
        if expect is not None and info.ref != expect:
            with self._lock:
                self._held.pop(expect, None)
            raise RemoteNotFound(f"tensor {expect} is gone from the server, and the array this session put under it has "
                                 f"changed since (it now hashes to {info.ref}): put it again", grpc.StatusCode.NOT_FOUND)
        return info

    def _hold(self, a: np.ndarray, info: pb.TensorInfo, hold: bool) -> TensorRef:
        ref = TensorRef(info.ref, DTYPE_FROM_PB[info.dtype], tuple(info.shape))
        if hold:
            with self._lock:
                self._held[ref.id] = a
        return ref

    def _let_go(self, refs: Any) -> list[str]:
        """The ids of the refs in `refs`, no longer held here."""
        ids = [x.id for x in tree_flatten(refs)[0] if type(x) is TensorRef]
        with self._lock:
            for r in ids:
                self._held.pop(r, None)
        return ids

    def _forget(self, graph_id: str) -> None:
        with self._lock:
            self._known.pop(graph_id, None)


def _uploads(tree: Any) -> tuple[list[Any], Any, list[tuple[int, np.ndarray]]]:
    """`tree`'s leaves and spec, and the arrays to put: (position among the leaves, the leaf as a
    contiguous array) for each array leaf that is not a TensorRef already."""
    leaves, spec = tree_flatten(tree)
    todo = [(i, contiguous(_as_array(x))) for i, x in enumerate(leaves) if type(x) is not TensorRef and _is_array_leaf(x)]
    return leaves, spec, todo


def _merge_pages(listing: pb.ListTensorsResponse, page: pb.ListTensorsResponse) -> None:
    listing.tensors.extend(page.tensors)
    listing.bytes, listing.max_bytes, listing.ttl_seconds = page.bytes, page.max_bytes, page.ttl_seconds


def _evaluate_request(gid: str, g: Graph | None, inputs: Mapping[str, Any], outputs: Sequence[str] | None,
                      keep: bool) -> pb.EvaluateRequest:
    req = pb.EvaluateRequest(graph_id=gid, outputs=list(outputs or ()), keep=keep)
    _fill(req.inputs, inputs, _input_types(g))
    return req


def _gradient_request(gid: str, g: Graph | None, inputs: Mapping[str, Any], wrt: Sequence[str],
                      seeds: Mapping[str, Any] | None, outputs: Sequence[str] | None,
                      batch_axes: Mapping[str, int] | None, keep: bool) -> pb.GradientRequest:
    req = pb.GradientRequest(graph_id=gid, wrt=list(wrt), outputs=list(outputs or ()), batch_axes=dict(batch_axes or {}),
                             keep=keep)
    _fill(req.inputs, inputs, _input_types(g))
    _fill(req.seeds, seeds or {}, _output_types(g), "seed for output")
    return req


def _gradient_result(resp: pb.GradientResponse, g: Graph | None, wrt: Sequence[str],
                     outputs: Sequence[str] | None) -> GradientResult:
    order = list(outputs or (g.output_names() if g is not None else ()))
    return GradientResult(_in_order(_tensors(resp.outputs), order), _in_order(_tensors(resp.grads), wrt))


def _batch_gradient_request(gid: str, g: Graph | None, inputs: Sequence[Mapping[str, Any]], wrt: Sequence[str],
                            seeds: Sequence[Mapping[str, Any]] | None, outputs: Sequence[str] | None,
                            keep: bool) -> pb.BatchGradientRequest:
    req = pb.BatchGradientRequest(graph_id=gid, wrt=list(wrt), outputs=list(outputs or ()), keep=keep)
    in_types, out_types = _input_types(g), _output_types(g)
    for k, item in enumerate(inputs):
        entry = req.items.add()
        _fill(entry.inputs, item, in_types)
        _fill(entry.seeds, seeds[k] if seeds is not None else {}, out_types, "seed for output")
    return req


def _job_spec(fn: Functional, fun: Callable, params0: Any, args: tuple | Any, optimizer: Any, steps: int,
              tol: float | None, batch_size: int | None, seed: int, batch_axes: Mapping[str, int] | None, name: str,
              checkpoint_every: int) -> tuple[pb.JobSpec, list[str]]:
    """The SubmitJob spec of `minimize(fun, params0, args, ...)` (traced by `fn`) and the names of params0's leaves."""
    if optimizer is None:
        optimizer = optim.LBFGS() if batch_size is None else optim.Adam()
    spec_dict = optimizer if isinstance(optimizer, Mapping) else optimizer.spec()
    args = args if isinstance(args, tuple) else (args,)
    traced_args = args
    if batch_size:  # the graph takes one minibatch; the server cuts them from the full args
        traced_args = tuple(unflatten(flatten(a, "")[1], [_first_rows(x, batch_size) for _, x in flatten(a, "")[0]])
                            for a in args)
    # a job runs on the values of now: captured arrays are constants of its graph
    t, _ = fn.prepare(fun, (params0, *traced_args), constants=True)
    param_names = t.in_names[:len(flatten(params0, "")[0])]  # the first argument's leaves come first
    spec = pb.JobSpec(graph_id=t.graph.id, loss=t.out_names[0], optimizer_json=json.dumps(spec_dict), steps=steps,
                      tol=tol or 0.0, batch_size=batch_size or 0, seed=seed, batch_axes=dict(batch_axes or {}),
                      checkpoint_every=checkpoint_every, name=name)
    spec.graph.CopyFrom(t.graph.to_proto())
    leaves = [x for a in (params0, *args) for _, x in flatten(a, "")[0]]
    for n, x in zip(t.in_names, leaves, strict=True):
        target = spec.params0 if n in param_names else spec.args
        _fill_one(target[n], x)
    spec.arg_order.extend(n for n in t.in_names if n not in param_names)
    return spec, param_names


# ---------------------------------------------------------------- the session


class Session(_SessionState):
    """A connection to a gradserve server with the functional API of the local engine."""

    def __init__(self, address: str, token: str | None = None, tls: bool | str | Path | bytes | None = None,
                 timeout: float = 60.0, max_message_bytes: int = 256 << 20, chunk_bytes: int = CHUNK_BYTES):
        super().__init__(address, token, tls, timeout, max_message_bytes, chunk_bytes)
        if self._credentials is not None:
            self._channel = grpc.secure_channel(address, self._credentials, self._options)
        else:
            self._channel = grpc.insecure_channel(address, self._options)
        self._stub = service_pb2_grpc.GradientServiceStub(self._channel)
        self._put, self._get = self._streams(self._channel)
        self._fn = Functional(_RemoteBackend(self))
        self._fn_keep = Functional(_RemoteBackend(self, keep=True))

    # ---- lifecycle
    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- transport
    def _call(self, method: str, request: Any, graph_id: str | None = None, idempotent: bool = True,
              timeout: float | None = None) -> Any:
        """Call with a deadline; retry UNAVAILABLE with backoff inside it; on NOT_FOUND for a
        graph this session registered, register it again and retry once; upload again the
        tensors this session put that the server lost."""
        attempts = _Attempts(self.timeout if timeout is None else timeout)
        while True:
            try:
                return getattr(self._stub, method)(request, timeout=attempts.timeout(), metadata=self._metadata)
            except grpc.RpcError as e:
                self._recover(e, attempts, graph_id, idempotent)

    def _recover(self, e: grpc.RpcError, attempts: _Attempts, graph_id: str | None = None, idempotent: bool = True,
                 refs: Sequence[str] | None = None) -> None:
        """Make the next try of a failed call possible, or raise `e` as a RemoteError."""
        delay = attempts.backoff(e, idempotent)
        if delay is not None:
            time.sleep(delay)
            return
        lost = self._lost(e, attempts, refs)
        if lost:
            for r, a in lost:
                self._upload(a, attempts.remaining(), expect=r)
            return
        graph = self._reregister(e, graph_id, attempts)
        if graph is None:
            raise _remote_error(e) from None
        self._register(graph, attempts.remaining())

    def _upload(self, a: np.ndarray, timeout: float | None = None, expect: str | None = None) -> pb.TensorInfo:
        """One PutTensor stream (retried on UNAVAILABLE inside the deadline: it is idempotent)."""
        attempts = _Attempts(self.timeout if timeout is None else timeout)
        while True:
            try:
                info = self._put(chunks(a, self.chunk_bytes), timeout=attempts.timeout(), metadata=self._metadata).tensor
                return self._uploaded(info, expect)
            except grpc.RpcError as e:
                delay = attempts.backoff(e)
                if delay is None:
                    raise _remote_error(e) from None
                time.sleep(delay)

    def _register(self, graph: Graph, timeout: float | None = None) -> str:
        return self._registered(graph, self._call("RegisterGraph", pb.RegisterGraphRequest(graph=graph.to_proto()),
                                                  timeout=timeout))

    def _ensure(self, graph: Graph) -> str:
        if graph.id not in self._known:
            self._register(graph)
        return graph.id

    def _graph_id(self, graph: Graph | str) -> str:
        return self._ensure(graph) if isinstance(graph, Graph) else graph

    # ---- tensors held by the server
    def put(self, tree: Any, hold: bool = True) -> Any:
        """Upload the arrays of `tree` (streamed in chunks, so larger than the message limit is
        fine); returns the same tree with a `gs.TensorRef` for each array (refs and static leaves
        stay as they are). With `hold` (the default) the session keeps each array, so a server
        that lost one gets it again when a call names it; `release` lets go."""
        leaves, spec, todo = _uploads(tree)
        for i, a in todo:
            leaves[i] = self._hold(a, self._upload(a), hold)
        return unflatten(spec, leaves)

    def get(self, refs: Any) -> Any:
        """Download the tensors of a tree of refs (streamed); returns the same tree of arrays."""
        leaves, spec = tree_flatten(refs)
        return unflatten(spec, [self._download(x) if type(x) is TensorRef else x for x in leaves])

    def release(self, refs: Any) -> int:
        """Let the server drop these tensors now (a job or vjp session using one keeps it until
        it is done) and stop holding their arrays here; returns how many the server held."""
        ids = self._let_go(refs)
        return int(self._call("ReleaseTensor", pb.ReleaseTensorRequest(refs=ids)).released) if ids else 0

    def tensors(self) -> pb.ListTensorsResponse:
        """What the server's tensor store holds: `.tensors` (ref, dtype, shape, bytes, pinned,
        idle_seconds each; every page of the listing), `.bytes`, `.max_bytes`, `.ttl_seconds`."""
        listing = pb.ListTensorsResponse()
        for page in self._pages("ListTensors", pb.ListTensorsRequest):
            _merge_pages(listing, page)
        return listing

    def _pages(self, method: str, request: Callable[..., Any]) -> Iterator[Any]:
        """The pages of a list RPC in order, each one call, following `next_page_token`."""
        token = ""
        while True:
            page = self._call(method, request(page_size=LIST_PAGE_SIZE, page_token=token))
            yield page
            token = page.next_page_token
            if not token:
                return

    def _download(self, ref: TensorRef) -> np.ndarray:
        attempts = _Attempts(self.timeout)
        while True:
            asm = Assembler(_DOWNLOAD_LIMITS, where=f"GetTensor {ref.id}")
            try:
                for raw in self._get(pb.GetTensorRequest(ref=ref.id, chunk_bytes=self.chunk_bytes),
                                     timeout=attempts.timeout(), metadata=self._metadata):
                    asm.add(raw)
            except grpc.RpcError as e:
                self._recover(e, attempts, refs=[ref.id])
                continue
            return _assembled(asm)

    # ---- graph-level API
    def register(self, graph: Graph) -> str:
        """Register `graph` (idempotent); returns its id, the content hash."""
        return self._register(graph)

    def evaluate(self, graph: Graph | str, inputs: Mapping[str, Any], outputs: Sequence[str] | None = None,
                 keep: bool = False) -> dict:
        """The outputs for `inputs` (arrays or TensorRefs); with `keep` they stay on the server
        and come back as TensorRefs."""
        gid = self._graph_id(graph)
        req = _evaluate_request(gid, self._graph(graph), inputs, outputs, keep)
        return _tensors(self._call("Evaluate", req, gid).outputs)

    def gradient(self, graph: Graph | str, inputs: Mapping[str, Any], wrt: Sequence[str],
                 seeds: Mapping[str, Any] | None = None, outputs: Sequence[str] | None = None,
                 batch_axes: Mapping[str, int] | None = None, keep: bool = False) -> GradientResult:
        """Outputs and gradients; `batch_axes` lets the server shard the call over its workers.
        Inputs and seeds may be TensorRefs; with `keep` the gradients stay on the server and
        come back as TensorRefs."""
        gid = self._graph_id(graph)
        g = self._graph(graph)
        req = _gradient_request(gid, g, inputs, wrt, seeds, outputs, batch_axes, keep)
        return _gradient_result(self._call("Gradient", req, gid), g, wrt, outputs)

    def batch_gradient(self, graph: Graph | str, inputs: Sequence[Mapping[str, Any]], wrt: Sequence[str],
                       seeds: Sequence[Mapping[str, Any]] | None = None,
                       outputs: Sequence[str] | None = None, keep: bool = False) -> list[GradientResult]:
        gid = self._graph_id(graph)
        g = self._graph(graph)
        req = _batch_gradient_request(gid, g, inputs, wrt, seeds, outputs, keep)
        return [_gradient_result(r, g, wrt, outputs) for r in self._call("BatchGradient", req, gid).results]

    def graphs(self) -> list[pb.GraphInfo]:
        """A summary of every registered graph (graph_id, nodes, bytes, input_count, output_count), by id."""
        return [info for page in self._pages("ListGraphs", pb.ListGraphsRequest) for info in page.graphs]

    def graph(self, graph_id: str) -> pb.GetGraphResponse:
        """A registered graph's summary (`.info`: nodes, bytes, input and output counts) and its
        signature: `.inputs` and `.outputs`, each with name, dtype (a `gradserve.v1.DType`) and shape."""
        return self._call("GetGraph", pb.GetGraphRequest(graph_id=graph_id))

    def delete(self, graph_id: str) -> bool:
        """Delete a registered graph (and the server's plans of it); False: it was not registered."""
        self._forget(graph_id)
        return self._call("DeleteGraph", pb.DeleteGraphRequest(graph_id=graph_id)).deleted

    # ---- the functional API, executed remotely
    def grad(self, f: Callable, argnums: int | Sequence[int] | None = None, has_aux: bool = False,
             batch_axes: Mapping[str, int] | None = None, argnames: str | Sequence[str] | None = None,
             keep: bool = False) -> Callable:
        """`gs.grad`, run by the server; with `batch_axes` it may shard the batch over workers.
        Arguments may hold TensorRefs (`remote.put`); with `keep` the gradient comes back as a
        tree of TensorRefs, its values left on the server."""
        return (self._fn_keep if keep else self._fn).grad(f, argnums, has_aux, batch_axes, argnames)

    def value_and_grad(self, f: Callable, argnums: int | Sequence[int] | None = None, has_aux: bool = False,
                       batch_axes: Mapping[str, int] | None = None, argnames: str | Sequence[str] | None = None,
                       keep: bool = False) -> Callable:
        return (self._fn_keep if keep else self._fn).value_and_grad(f, argnums, has_aux, batch_axes, argnames)

    def jvp(self, f: Callable, primals: Sequence[Any], tangents: Sequence[Any], /, **kwargs: Any) -> tuple[Any, Any]:
        return self._fn.jvp(f, primals, tangents, **kwargs)

    def jacobian(self, f: Callable, argnums: int | Sequence[int] | None = None,
                 argnames: str | Sequence[str] | None = None) -> Callable:
        return self._fn.jacobian(f, argnums, argnames)

    def hessian(self, f: Callable, argnums: int | Sequence[int] | None = None,
                argnames: str | Sequence[str] | None = None) -> Callable:
        return self._fn.hessian(f, argnums, argnames)

    def hvp(self, f: Callable, primals: Sequence[Any], vectors: Sequence[Any], /, **kwargs: Any) -> tuple:
        return self._fn.hvp(f, primals, vectors, **kwargs)

    def trace(self, f: Callable, /, *args: Any, **kwargs: Any) -> Graph:
        return self._fn.trace(f, *args, **kwargs)

    # ---- jobs
    def minimize(self, fun: Callable, params0: Any, args: tuple = (), optimizer: Any = None, steps: int = 1000,
                 tol: float | None = None, batch_size: int | None = None, seed: int = 0,
                 batch_axes: Mapping[str, int] | None = None, name: str = "", checkpoint_every: int = 0) -> Job:
        """Submit `gs.minimize(fun, params0, args, ...)` as a server-side job; returns the Job.
        `params0` and `args` may hold TensorRefs: the server keeps their values with the job (and
        the stored tensors while it runs), so only the refs travel."""
        spec, param_names = _job_spec(self._fn, fun, params0, args, optimizer, steps, tol, batch_size, seed, batch_axes,
                                      name, checkpoint_every)
        job = self._call("SubmitJob", pb.SubmitJobRequest(spec=spec), idempotent=False).job
        return Job(self, job.job_id, params0, param_names)

    def job(self, job_id: str) -> Job:
        """Reattach to a job by id (from any process)."""
        self._call("GetJob", pb.GetJobRequest(job_id=job_id))
        return Job(self, job_id)

    def jobs(self) -> list[Job]:
        """Every job on the server, oldest first."""
        return [Job(self, j.job_id) for j in self.job_summaries()]

    def delete_job(self, job_id: str) -> bool:
        """Delete a finished job on the server: its record, history and checkpoints; False: there
        was no such job. A job not finished is refused (`RemoteFailedPrecondition`): cancel it first."""
        return self._call("DeleteJob", pb.DeleteJobRequest(job_id=job_id)).deleted

    def job_summaries(self) -> Iterator[pb.Job]:
        """Every job's summary, oldest first, page by page as they come: a `pb.Job` without its
        optimizer_json, its name and message cut to 256 characters (`Job.info()` has them all)."""
        for page in self._pages("ListJobs", pb.ListJobsRequest):
            yield from page.jobs

    def vjp(self, f: Callable, /, *primals: Any, ttl: float = 0.0, **kwargs: Any) -> tuple[Any, RemoteVjp]:
        """Run the forward pass once on the server; the returned function sends only cotangents.
        Keyword arguments (but `ttl`, the residuals' lifetime) go to `f`, not differentiated."""
        t, values = self._fn.prepare(f, primals, kwargs)
        gid = self._ensure(t.graph)
        groups = self._fn._argnum_leaves_floats(t, f, primals)
        wrt = [n for grp in groups for n in grp]
        req = pb.OpenVjpRequest(graph_id=gid, wrt=wrt, ttl_seconds=ttl)
        _fill(req.inputs, dict(zip(t.in_names, values, strict=True)), _input_types(t.graph))
        resp = self._call("OpenVjp", req, gid)
        outs = _tensors(resp.outputs)
        shapes = [shaped_like(p, name) for name, p in zip(_param_names(f, len(primals)), primals, strict=True)]
        return unflatten(t.out_treedef, [outs[n] for n in t.out_names]), RemoteVjp(self, resp.handle, t, shapes, groups)


def _result_request(job_id: str) -> pb.GetJobRequest:
    return pb.GetJobRequest(job_id=job_id, with_params=True, with_history=True)


def _job_result(resp: pb.GetJobResponse, like: Any, names: Sequence[str]) -> OptimizeResult:
    """A job's OptimizeResult from its GetJob (with params and history)."""
    job = resp.job
    x = _shaped(_tensors(resp.params), like, names)
    jac_flat = _tensors(resp.jac)
    jac = _shaped(jac_flat, like, names) if jac_flat else None
    counts = resp.counts
    status = counts.status if counts.HasField("status") and job.status in FINISHED else None
    return OptimizeResult(x=x, fun=resp.fun, jac=jac, grad_norm=None if jac is None else tree_norm(jac),
                          nit=counts.nit, nfev=counts.nfev, njev=counts.nfev, nstep=job.step, status=status,
                          success=job.status == "succeeded", message=job.message,
                          history=_history(resp), optimizer=json.loads(job.optimizer_json or "null"),
                          opt_state=None)


def _shaped(flat: dict[str, Any], like: Any, names: Sequence[str]) -> Any:
    """Values by input name, shaped like params0 when it is known (`like`, its leaves' `names`)."""
    if like is not None and names and all(n in flat for n in names):
        return unflatten(flatten(like, "")[1], [flat[n] for n in names])
    return flat


def _history(resp: pb.GetJobResponse) -> dict[str, list]:
    # the kept points are at the multiples of a power-of-two stride (the server's History): step // points
    n, last = len(resp.loss), resp.job.step
    stride = 1 << max((last // n).bit_length() - 1, 0) if n else 1
    return {"step": [stride * (i + 1) for i in range(n)], "loss": list(resp.loss), "grad_norm": list(resp.grad_norm)}


def _time_left(job_id: str, deadline: float | None, timeout: float | None) -> float | None:
    """Seconds left of a job's wait (None: no limit); RemoteDeadlineExceeded when none are."""
    remaining = None if deadline is None else deadline - time.monotonic()
    if remaining is not None and remaining <= 0:
        raise RemoteDeadlineExceeded(f"job {job_id} did not finish within {timeout} s")
    return remaining


def _job_repr(job_id: str, seen: pb.Job | None) -> str:
    if seen is None:
        return f"Job({job_id!r})"
    return f"Job({job_id!r}, {seen.status} at step {seen.step}/{seen.steps} when last seen)"


class Job:
    """A server-side optimisation job (from `remote.minimize`, `remote.job(id)` or `remote.jobs()`)."""

    def __init__(self, session: Session, job_id: str, params_like: Any = None, param_names: Sequence[str] | None = None):
        self.session, self.id = session, job_id
        self._like, self._names = params_like, list(param_names or [])
        self._seen: pb.Job | None = None  # the job as the last call that read it found it

    def __repr__(self) -> str:
        """What this object knows, without a call (the server may be slow, or gone)."""
        return _job_repr(self.id, self._seen)

    def info(self) -> pb.Job:
        self._seen = self.session._call("GetJob", pb.GetJobRequest(job_id=self.id)).job
        return self._seen

    @property
    def status(self) -> str:
        """queued, running, succeeded, failed or cancelled."""
        return self.info().status

    def wait(self, timeout: float | None = None, progress: bool = False) -> Job:
        """Block until the job finishes (following its progress stream); a tqdm bar with `progress`.
        A server with no room for another stream (RESOURCE_EXHAUSTED) is polled with GetJob
        instead, at growing intervals (0.05 s, doubling, at most 1 s)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        info = self.info()
        if info.status in FINISHED:
            return self
        progress_bar = None
        if progress:
            from tqdm.auto import tqdm

            # redrawn at most 4 times a second, however fast the steps come (tqdm skips the updates between)
            progress_bar = tqdm(total=info.steps, initial=info.step, desc=f"job {self.id}", unit="step", mininterval=0.25)
        bar = _Progress(progress_bar, info.step)  # follow the events from here on
        try:
            while True:
                remaining = _time_left(self.id, deadline, timeout)
                try:
                    stream = self.session._stub.WatchJob(pb.WatchJobRequest(job_id=self.id, from_step=bar.step),
                                                         timeout=remaining, metadata=self.session._metadata)
                    for event in stream:
                        bar.advance(event.step, event.loss)
                        if event.status in FINISHED:
                            return self
                except grpc.RpcError as e:
                    if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                        raise RemoteDeadlineExceeded(f"job {self.id} did not finish within {timeout} s", e.code()) from None
                    if e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:  # the server's watchers are all taken
                        return self._poll(deadline, timeout, bar)
                    if e.code() != grpc.StatusCode.UNAVAILABLE:  # a restarting server: watch again
                        raise _remote_error(e) from None
                    time.sleep(0.2)
        finally:
            if progress_bar is not None:
                progress_bar.close()

    def _poll(self, deadline: float | None, timeout: float | None, bar: _Progress) -> Job:
        """Wait by GetJob calls, each wait between them twice the last (up to POLL_SECONDS[1])."""
        delay = POLL_SECONDS[0]
        while True:
            remaining = _time_left(self.id, deadline, timeout)
            call_timeout = self.session.timeout if remaining is None else min(self.session.timeout, remaining)
            info = self.session._call("GetJob", pb.GetJobRequest(job_id=self.id), timeout=call_timeout).job
            bar.advance(info.step, info.loss)
            if info.status in FINISHED:
                return self
            time.sleep(delay if remaining is None else min(delay, remaining))
            delay = min(2 * delay, POLL_SECONDS[1])

    def result(self) -> OptimizeResult:
        """The OptimizeResult, with `gs.minimize`'s fields and meanings: x (shaped like params0; a
        dict of input names for a reattached job), fun, jac (the gradient at x, like x; None for a
        minibatch job or one that did not end by itself), grad_norm (of jac), nit (the optimiser's
        iterations), nfev, njev, nstep, status (scipy-style, None until the job finishes; 3 a job
        that failed with an error, 99 a cancelled one), success, message, history (the kept points:
        `history()`), optimizer (its spec) and opt_state (None: it stays on the server)."""
        resp = self.session._call("GetJob", _result_request(self.id))
        self._seen = resp.job
        return _job_result(resp, self._like, self._names)

    def history(self) -> dict[str, list]:
        """The job's kept progress points: `{"step", "loss", "grad_norm"}` (every step up to the
        server's `--job-history` points, then evenly spaced)."""
        resp = self.session._call("GetJob", pb.GetJobRequest(job_id=self.id, with_history=True))
        self._seen = resp.job
        return _history(resp)

    def cancel(self) -> Job:
        self.session._call("CancelJob", pb.CancelJobRequest(job_id=self.id))
        return self

    def delete(self) -> bool:
        """Delete this job on the server once it has finished (`Session.delete_job`)."""
        return self.session.delete_job(self.id)

    def plot(self, path: str | Path | None = None, *, smooth: float = 0.0) -> Any:
        """The loss curve on a new `matplotlib.figure.Figure` (returned; saved to `path` when given,
        as its suffix says). No pyplot and no backend change: a notebook shows the returned figure.
        `smooth` in [0, 1): also draw the exponential moving average of the loss that TensorBoard's
        smoothing slider draws (debiased), over the faded raw curve. Needs matplotlib (the `plot` extra)."""
        from matplotlib.figure import Figure

        weight = float(smooth)
        if not 0.0 <= weight < 1.0:
            raise ValueError(f"smooth must be in [0, 1), got {smooth!r}")
        history = self.history()
        steps, loss = history["step"], history["loss"]
        fig = Figure(figsize=(6, 4))
        ax = fig.add_subplot()
        if weight:
            ax.plot(steps, loss, color="C0", alpha=0.3, label="loss")
            ax.plot(steps, _smoothed(loss, weight), color="C0", label=f"loss, smoothed ({weight:g})")
            ax.legend()
        else:
            ax.plot(steps, loss, color="C0")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_yscale("log" if loss and min(loss) > 0 else "linear")
        ax.set_title(f"job {self.id}")
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=100)
        return fig


def _smoothed(values: Sequence[float], weight: float) -> list[float]:
    """TensorBoard's scalar smoothing: the exponential moving average `last = weight * last + (1 -
    weight) * value`, divided by `1 - weight ** k` after k values (no pull towards 0 at the start);
    a non-finite value passes through unsmoothed, and a constant series stays as it is."""
    values = [float(v) for v in values]
    if all(v == values[0] for v in values):
        return values
    out, last, k = [], 0.0, 0
    for v in values:
        if not math.isfinite(v):
            out.append(v)
            continue
        last = last * weight + (1 - weight) * v
        k += 1
        out.append(last / (1 - weight ** k))
    return out


class _Progress:
    """The step a wait has seen, and its tqdm bar if it shows one."""

    def __init__(self, bar: Any, step: int):
        self.bar, self.step = bar, step

    def advance(self, step: int, loss: float) -> None:
        if self.bar is not None and step > self.step:
            self.bar.update(step - self.step)
            self.bar.set_postfix_str(f"loss={loss:.4g}", refresh=False)  # shown with the next redraw
        self.step = max(self.step, step)


class RemoteVjp:
    """`vjp_fn(cotangent)` of a residual session: one CallVjp per call, no forward pass."""

    def __init__(self, session: Session, handle: str, traced: Any, shapes: list[Callable], groups: list[list[str]]):
        self.session, self.handle, self._t, self._shapes, self._groups = session, handle, traced, shapes, groups
        self._float_outs = [n for n in traced.out_names if traced.graph.aval(dict(traced.graph.outputs)[n])[0] in FLOATS]

    def __call__(self, cotangent: Any, batched: bool = False, keep: bool = False) -> tuple:
        """Cotangents shaped like the output (one leading axis more when `batched`), returned
        as one cotangent per primal (with the same leading axis when batched); with `keep` as
        TensorRefs, the values left on the server."""
        cts = [_slot_value(c) if type(c) is not TensorRef else c for c in tree_flatten(cotangent)[0] if _is_array_leaf(c)]
        if len(cts) != len(self._t.out_names):
            raise ValueError(f"cotangent has {len(cts)} leaves for {len(self._t.out_names)} outputs {self._t.out_names}")
        req = pb.CallVjpRequest(handle=self.handle, batched=batched, keep=keep)
        _fill(req.cotangents, {n: c for n, c in zip(self._t.out_names, cts, strict=True) if n in self._float_outs},
              _output_types(self._t.graph), "cotangent for output")
        grads = _tensors(self.session._call("CallVjp", req).grads)
        return tuple(like(grads) if grp else None for like, grp in zip(self._shapes, self._groups, strict=True))

    def close(self) -> None:
        """Release the server-side residuals now (they also go on TTL or under memory pressure)."""
        self.session._call("CloseVjp", pb.CloseVjpRequest(handle=self.handle))

    def __enter__(self) -> RemoteVjp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _RemoteBackend:
    """The Engine's interface (graph + named arrays) over RPCs, for the shared Functional API.
    Inputs may be TensorRefs (the server resolves them); with `keep`, gradients come back as refs."""

    accepts_refs = True

    def __init__(self, session: Session, keep: bool = False):
        self.s, self.keep = session, keep

    def evaluate(self, graph: Graph, inputs: Mapping[str, Any], outputs: Sequence[str] | None = None) -> dict:
        return self.s.evaluate(graph, inputs, outputs)

    def vjp(self, graph: Graph, inputs: Mapping[str, Any], wrt: Sequence[str], seeds: Mapping[str, Any] | None = None,
            outputs: Sequence[str] | None = None, batch_axes: Mapping[str, int] | None = None) -> tuple[dict, dict]:
        r = self.s.gradient(graph, inputs, wrt, seeds, outputs, batch_axes, keep=self.keep)
        return r.outputs, r.grads

    def jvp(self, graph: Graph, inputs: Mapping[str, Any], tangents: Mapping[str, Any]) -> tuple[dict, dict]:
        gid = self.s._ensure(graph)
        req = pb.JvpRequest(graph_id=gid)
        types = _input_types(graph)
        _fill(req.inputs, inputs, types)
        _fill(req.tangents, tangents, types, "tangent for input")
        resp = self.s._call("Jvp", req, gid)
        return _tensors(resp.outputs), _tensors(resp.tangents)

    def jacobian(self, graph: Graph, inputs: Mapping[str, Any], wrt: Sequence[str],
                 outputs: Sequence[str] | None = None) -> dict:
        gid = self.s._ensure(graph)
        req = pb.JacobianRequest(graph_id=gid, wrt=list(wrt), outputs=list(outputs or ()))
        _fill(req.inputs, inputs, _input_types(graph))
        resp = self.s._call("Jacobian", req, gid)
        return {(e.output, e.input): tensor_from_proto(e.value) for e in resp.entries}

    def hessian(self, graph: Graph, inputs: Mapping[str, Any], wrt: Sequence[str], output: str) -> dict:
        gid = self.s._ensure(graph)
        req = pb.HessianRequest(graph_id=gid, wrt=list(wrt), output=output)
        _fill(req.inputs, inputs, _input_types(graph))
        resp = self.s._call("Hessian", req, gid)
        return {(e.output, e.input): tensor_from_proto(e.value) for e in resp.entries}

    def hvp(self, graph: Graph, inputs: Mapping[str, Any], wrt: Sequence[str], output: str,
            vectors: Mapping[str, Any]) -> dict:
        gid = self.s._ensure(graph)
        req = pb.HessianRequest(graph_id=gid, wrt=list(wrt), output=output)
        types = _input_types(graph)
        _fill(req.inputs, inputs, types)
        _fill(req.vectors, vectors, types, "vector for input")
        resp = self.s._call("Hessian", req, gid)
        return {e.input: tensor_from_proto(e.value) for e in resp.entries}


def connect(address: str, token: str | None = None, tls: bool | str | Path | bytes | None = None,
            timeout: float = 60.0, max_message_bytes: int = 256 << 20, chunk_bytes: int = CHUNK_BYTES) -> Session:
    """A session with the server at `address` ("host:port"); use it as a context manager.

    `token`: the bearer token the server was started with; `tls`: True for the system's roots,
    or a CA certificate (path or PEM bytes); `timeout`: the deadline of each call, in seconds;
    `max_message_bytes`: the largest message this client sends or takes; `chunk_bytes`: tensor
    bytes per message of `put`/`get` streams (the default fits any server's message limit).
    """
    return Session(address, token=token, tls=tls, timeout=timeout, max_message_bytes=max_message_bytes,
                   chunk_bytes=chunk_bytes)
