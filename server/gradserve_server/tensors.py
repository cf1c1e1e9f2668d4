"""The tensor store: tensors held on the server under their content id, so a client uploads an
array once (PutTensor) and then passes a reference in place of its bytes, and results kept with
`keep` stay here for the next call.

Bounded in bytes (least recently used first out), with a TTL for tensors nobody uses; a tensor a
running job or an open residual session was given is pinned (neither evicted nor expired) while
that owner lives. Stored arrays are read-only: a computation that reads one cannot change it
under another. An unknown reference is NOT_FOUND (`TensorNotFound`, naming every missing id of
the request in the trailing metadata, so the SDK can upload them again and retry).
"""

from __future__ import annotations

import heapq
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
from google.protobuf.message import Message

from gradserve_engine.errors import InvalidRequest, LimitError, ShapeError, TensorNotFound
from gradserve_engine.ir import DEFAULT_LIMITS, Limits, type_str
from gradserve_engine.ops.core import DTYPES, dtype_name
from gradserve_engine.v1 import graph_pb2
from gradserve_engine.v1 import service_pb2 as pb
from gradserve_engine.wire import (
    CHUNK_BYTES,
    DTYPE_FROM_PB,
    PB_DTYPE,
    Assembler,
    byte_view,
    check_ref,
    chunk_header,
    contiguous,
    encode_chunk,
    tensor_id,
    wire_array,
)

from .metrics import Metrics

MAX_MISSING_LISTED = 64  # ids in that metadata (64 x 65 bytes stays well inside the trailers' limit)


@dataclass
class Stored:
    array: np.ndarray  # read-only, native byte order
    nbytes: int
    used: float  # clock of the last put or use
    pins: list[Callable[[], bool]] = field(default_factory=list)  # owner alive? (a job, a residual session)
    released: bool = False  # released while pinned: goes when its pins do

    def pinned(self) -> bool:
        self.pins = [alive for alive in self.pins if alive()]
        return bool(self.pins)


class TensorStore:
    """Tensors by content id, bounded by `max_bytes` (LRU), dropped after `ttl` seconds unused."""

    def __init__(self, max_bytes: int, ttl: float = 3600.0, limits: Limits = DEFAULT_LIMITS, metrics: Metrics | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.max_bytes, self.ttl, self.limits = max_bytes, ttl, limits
        self.metrics = metrics or Metrics()
        self._clock = clock
        self._tensors: OrderedDict[str, Stored] = OrderedDict()  # least recently used first
        self._bytes = 0
        self._receiving = 0  # bytes of uploads in progress: together at most max_bytes
        self._lock = threading.Lock()
        self.metrics.gauge_fn("gradserve_tensor_store_bytes", lambda: self._bytes)
        self.metrics.gauge_fn("gradserve_tensors", lambda: len(self._tensors))

    # ---- adding
    def receive(self, raw_chunks: Iterable[bytes]) -> tuple[str, np.ndarray, bool]:
        """Assemble a PutTensor stream (validated before anything is allocated, hashed as it
        arrives) and store it; returns (id, array, created). Uploads in progress together
        reserve at most the store's bound, so slow or abandoned streams cannot pile up memory."""
        reserved = [0]

        def reserve(nbytes: int) -> None:
            with self._lock:
                if self._receiving + nbytes > self.max_bytes:
                    raise LimitError(f"PutTensor: {self._receiving} bytes of uploads are in progress; {nbytes} more would "
                                     f"pass the tensor store's bound of {self.max_bytes} (--tensor-store-mib); retry later")
                self._receiving += nbytes
                reserved[0] = nbytes

        try:
            asm = Assembler(self.limits, self.max_bytes, hashing=True, where="PutTensor", reserve=reserve,
                            limit_name="the tensor store's bound (--tensor-store-mib)")
            for raw in raw_chunks:
                asm.add(raw)
            array, tid = asm.finish()
        finally:
            with self._lock:
                self._receiving -= reserved[0]
        if asm.ref and asm.ref != tid:
            raise InvalidRequest(f"PutTensor: the stream names its tensor {asm.ref[:64]!r}, but its content hashes to {tid}")
        created = self._insert(tid, array)
        return tid, array, created

    def keep(self, value: np.ndarray) -> tuple[str, np.ndarray]:
        """Store a result computed here (hashed now); returns (id, the stored array)."""
        a = np.asarray(value)
        if dtype_name(a.dtype) not in DTYPES:
            raise InvalidRequest(f"a result of dtype {a.dtype} cannot be kept; kept tensors are one of {list(DTYPES)}")
        tid = tensor_id(a)
        stored = contiguous(a).view()
        stored.flags.writeable = False
        if stored.nbytes > self.max_bytes:
            raise LimitError(f"a kept result of {stored.nbytes} bytes is over the tensor store's bound of {self.max_bytes} "
                             "(--tensor-store-mib); call without keep")
        self._insert(tid, stored)
        return tid, stored

    def _insert(self, tid: str, array: np.ndarray) -> bool:
        with self._lock:
            now = self._clock()
            old = self._tensors.get(tid)
            if old is not None:
                old.used, old.released = now, False
                self._tensors.move_to_end(tid)
                return False
            self._expire(now)
            need = self._bytes + array.nbytes - self.max_bytes
            victims = []  # least recently used first, pinned ones skipped; none evicted unless that makes room
            for victim, s in self._tensors.items() if need > 0 else ():
                if need <= 0:
                    break
                if not s.pinned():
                    victims.append(victim)
                    need -= s.nbytes
            if need > 0:
                raise LimitError(f"the tensor store holds {self._bytes} bytes of pinned tensors (in use by jobs or residual "
                                 f"sessions); {array.nbytes} more would pass its bound of {self.max_bytes} "
                                 "(--tensor-store-mib)")
            for victim in victims:
                self._drop(victim, "evicted")
            self._tensors[tid] = Stored(array, array.nbytes, now)
            self._bytes += array.nbytes
            return True

    # ---- using
    def get(self, tid: str, where: str = "tensor") -> np.ndarray:
        """The stored array (a use: renews its TTL and its place in the LRU)."""
        check_ref(tid, where)
        with self._lock:
            now = self._clock()
            self._expire(now)
            s = self._tensors.get(tid)
            if s is None:
                raise TensorNotFound(f"{where}: tensor {tid} is not in the server's tensor store (never put, released, "
                                     "expired or evicted; put it again)", (tid,))
            s.used = now
            self._tensors.move_to_end(tid)
            return s.array

    def resolve(self, t: graph_pb2.Tensor, where: str) -> np.ndarray:
        """A request tensor whose `ref` is set: the stored array, checked against the dtype and
        shape the request states (when it states them)."""
        if t.data:
            raise InvalidRequest(f"{where}: a tensor reference carries no data (got {len(t.data)} bytes with ref set)")
        a = self.get(t.ref, where)
        if t.dtype and (DTYPE_FROM_PB.get(t.dtype) != dtype_name(a.dtype) or tuple(t.shape) != a.shape):
            stated = type_str(DTYPE_FROM_PB[t.dtype], tuple(t.shape)) if t.dtype in DTYPE_FROM_PB else f"dtype code {t.dtype}"
            raise ShapeError(f"{where}: the request says {stated}, the stored tensor {t.ref} is "
                             f"{type_str(dtype_name(a.dtype), a.shape)}")
        return a

    def missing(self, refs: Iterable[str]) -> list[str]:
        with self._lock:
            self._expire(self._clock())
            return sorted({r for r in refs if r not in self._tensors})

    def pin(self, refs: Iterable[str], alive: Callable[[], bool]) -> None:
        """Keep these tensors (neither evicted nor expired) while `alive()` is true."""
        with self._lock:
            for r in set(refs):
                s = self._tensors.get(r)
                if s is not None:
                    s.pins.append(alive)

    # ---- releasing and listing
    def release(self, refs: Iterable[str]) -> int:
        """Drop these tensors now (pinned ones once their owners are done); returns how many
        the store held."""
        n = 0
        with self._lock:
            for r in set(refs):
                s = self._tensors.get(check_ref(r, "ReleaseTensor"))
                if s is None:
                    continue
                n += 1
                if s.pinned():
                    s.released = True
                else:
                    self._drop(r, "released")
        return n

    def list(self, after: str | None, limit: int) -> tuple[pb.ListTensorsResponse, bool]:
        """A page of the stored tensors, by ref: the first `limit` with refs after `after` (None:
        from the first), and whether more follow; with the store's totals."""
        with self._lock:
            now = self._clock()
            self._expire(now)
            refs = (tid for tid in self._tensors if after is None or tid > after)
            page = heapq.nsmallest(limit + 1, refs)
            more = len(page) > limit
            resp = pb.ListTensorsResponse(bytes=self._bytes, max_bytes=self.max_bytes, ttl_seconds=self.ttl)
            for tid in page[:limit]:
                s = self._tensors[tid]
                resp.tensors.add(ref=tid, dtype=PB_DTYPE[dtype_name(s.array.dtype)], shape=s.array.shape, bytes=s.nbytes,
                                 pinned=s.pinned(), idle_seconds=now - s.used)
        return resp, more

    def info(self, tid: str, array: np.ndarray) -> pb.TensorInfo:
        return pb.TensorInfo(ref=tid, dtype=PB_DTYPE[dtype_name(array.dtype)], shape=array.shape, bytes=array.nbytes)

    def stream(self, tid: str, chunk_bytes: int) -> Iterator[bytes]:
        """A GetTensor stream: encoded chunks, each a memoryview slice of the stored array joined
        to its header (one copy per chunk, into the message)."""
        a = wire_array(self.get(tid, "GetTensor"))
        view = byte_view(a)
        step = max(chunk_bytes, 1)
        yield encode_chunk(chunk_header(dtype_name(a.dtype), a.shape, tid), view[:step])
        for start in range(step, len(view), step):
            yield encode_chunk(b"", view[start:start + step])

    # ---- bookkeeping (under the lock)
    def _expire(self, now: float) -> None:
        if not self._tensors:
            return
        for tid in [k for k, s in self._tensors.items() if (s.released or now - s.used >= self.ttl) and not s.pinned()]:
            self._drop(tid, "released" if self._tensors[tid].released else "expired")

    def _drop(self, tid: str, why: str) -> int:
        s = self._tensors.pop(tid)
        self._bytes -= s.nbytes
        self.metrics.inc("gradserve_tensors_dropped_total", reason=why)
        return s.nbytes


def chunk_size(requested: int, max_message_bytes: int) -> int:
    """The data bytes per GetTensor chunk: what the caller asked (default CHUNK_BYTES), within
    the server's message limit less room for the header."""
    limit = max(max_message_bytes - 4096, 1)
    return min(requested if requested > 0 else CHUNK_BYTES, limit)


def refs_in(msg: Message) -> set[str]:
    """Every tensor reference anywhere in a request (maps, repeated and nested messages)."""
    found: set[str] = set()
    _walk(msg, found)
    return found


def _walk(msg: Message, found: set[str]) -> None:
    if isinstance(msg, graph_pb2.Tensor):
        if msg.ref:
            found.add(msg.ref)
        return
    if isinstance(msg, graph_pb2.Graph):  # constants are never references (refused when the graph is read)
        return
    for fd, value in msg.ListFields():
        if fd.message_type is None:
            continue
        if fd.message_type.GetOptions().map_entry:
            value_fd = fd.message_type.fields_by_name["value"]
            if value_fd.message_type is not None:
                for v in value.values():
                    _walk(v, found)
        elif fd.is_repeated:
            for v in value:
                _walk(v, found)
        else:
            _walk(value, found)
