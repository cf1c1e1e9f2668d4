"""Tensors in bulk on the wire: content ids and the chunks of PutTensor/GetTensor streams.

A stored tensor is named by its content (`tensor_id`), so the client and the server agree on it
and uploading the same tensor twice keeps one copy. The id is a two-level SHA-256: the
little-endian bytes are cut into leaves of `LEAF_BYTES`, each leaf is hashed on its own, and the
id is the hash of the dtype, the shape and the leaves' digests in order. One SHA-256 runs at
about 1.4 GB/s on one core, which capped uploads; leaves hash in parallel on the process's
thread pool (hashlib releases the GIL), and on the server while the stream is still arriving.

A tensor travels as a stream of `TensorChunk` messages: the first carries
dtype and shape, every chunk carries the next slice of the raw bytes. Both ends move those bytes
with as few copies as Python's gRPC allows: a chunk is encoded by joining a small header with a
memoryview slice of the array (one copy, into the message gRPC sends), and a received chunk is
parsed in place (`parse_chunk`: no protobuf object, no copy of the data) and copied once into the
preallocated array (`Assembler`). The parser reads any valid protobuf encoding of the message
(fields in any order, repeated, packed or not, unknown fields skipped), so other clients
(grpcurl, other languages) may send ordinary messages.
"""

from __future__ import annotations

import hashlib
import math
import re
import sys
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from . import threads
from .errors import InvalidRequest, LimitError
from .ir import DEFAULT_LIMITS, Limits, check_shape, type_str
from .ops.core import NP_DTYPES, dtype_name
from .v1 import graph_pb2

MISSING_KEY = "gradserve-missing-tensors"  # trailing metadata of a NOT_FOUND: the tensor ids it is about
HEADER_ROOM = 4096  # a chunk's bytes besides its data (dtype, shape, ref, tags): at most this
CHUNK_BYTES = (1 << 20) - HEADER_ROOM  # default data per chunk: a chunk fits the smallest message limit, 1 MiB
PB_DTYPE: dict[str, Any] = {name: graph_pb2.DType.Value(name.upper()) for name in NP_DTYPES}
DTYPE_FROM_PB = {code: name for name, code in PB_DTYPE.items()}
WIRE_DTYPES = {name: dt.newbyteorder("<") for name, dt in NP_DTYPES.items()}  # the wire is little-endian
_LITTLE = sys.byteorder == "little"
_REF = re.compile(r"[0-9a-f]{64}")
_DATA_TAG = bytes([3 << 3 | 2])  # field 3 (data), length-delimited


# ---------------------------------------------------------------- content ids


LEAF_BYTES = 1 << 20  # part of the id's definition: changing it changes every id
PARALLEL_LEAVES = 4  # tensors with at least this many leaves hash them on the thread pool


def _leaf_digest(data: memoryview) -> bytes:
    return hashlib.sha256(data).digest()


def leaf_digests(data: memoryview) -> list[bytes]:
    """The SHA-256 of each `LEAF_BYTES` slice of `data` in order (on the thread pool when many)."""
    n = -(-len(data) // LEAF_BYTES)
    digests = [b""] * n

    def hash_leaves(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            digests[i] = _leaf_digest(data[i * LEAF_BYTES:(i + 1) * LEAF_BYTES])

    if n < PARALLEL_LEAVES:
        hash_leaves(0, n)
    else:
        threads.pool().run(hash_leaves, threads.cuts(n, n))
    return digests


def combine_id(dtype: str, shape: Iterable[int], digests: Iterable[bytes]) -> str:
    """The content id of a tensor from its type and its leaves' digests."""
    h = hashlib.sha256(f"gradserve.tensor.v2\n{dtype} [{','.join(str(int(d)) for d in shape)}]\n".encode())
    h.update(b"".join(digests))
    return h.hexdigest()


def contiguous(a: Any) -> np.ndarray:
    """`a` as a C-contiguous array of its own shape (np.ascontiguousarray makes a 0-d array 1-d)."""
    a = np.asarray(a)
    return a if a.flags.c_contiguous else a.copy(order="C")


def wire_array(a: np.ndarray) -> np.ndarray:
    """`a` as the wire holds it: C-contiguous, little-endian (no copy when it already is)."""
    a = contiguous(a)
    if not (_LITTLE and a.dtype.isnative) and a.dtype.itemsize > 1:
        a = a.astype(a.dtype.newbyteorder("<"))
    return a


def byte_view(a: np.ndarray) -> memoryview:
    """The raw bytes of a C-contiguous array, without a copy."""
    return a.reshape(-1).view(np.uint8).data


def tensor_id(a: np.ndarray) -> str:
    """The content id of an array (its dtype must be one the wire carries)."""
    w = wire_array(a)
    return combine_id(dtype_name(w.dtype), w.shape, leaf_digests(byte_view(w)))


def check_ref(ref: str, where: str = "tensor") -> str:
    if not _REF.fullmatch(ref):
        shown = ref if len(ref) <= 80 else ref[:80] + "..."
        raise InvalidRequest(f"{where}: {shown!r} is not a tensor reference (64 lowercase hex digits, the tensor's "
                             "SHA-256 as PutTensor returns it)")
    return ref


# ---------------------------------------------------------------- chunks


def _varint_bytes(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def chunk_header(dtype: str = "", shape: Iterable[int] = (), ref: str = "") -> bytes:
    """The serialised fields of a chunk other than its data (empty for the chunks after the first)."""
    if not dtype and not ref:
        return b""
    msg = graph_pb2.Tensor(ref=ref)  # TensorChunk's fields 1, 2 and 4 are Tensor's
    if dtype:
        msg.dtype = PB_DTYPE[dtype]
        msg.shape[:] = list(shape)
    return msg.SerializeToString()


def encode_chunk(header: bytes, data: memoryview) -> bytes:
    """One TensorChunk message: `header` (from `chunk_header`) and a slice of raw bytes, joined
    in one copy."""
    if not len(data):
        return header
    return b"".join((header, _DATA_TAG, _varint_bytes(len(data)), data))


def chunks(a: np.ndarray, chunk_bytes: int = CHUNK_BYTES, ref: str = "") -> Iterable[bytes]:
    """The encoded chunks of an array (wire form: see `wire_array`), memoryview slices joined to
    their header; the first carries dtype and shape (and `ref`, when given)."""
    w = wire_array(a)
    view = byte_view(w)
    step = max(int(chunk_bytes), 1)
    yield encode_chunk(chunk_header(dtype_name(w.dtype), w.shape, ref), view[:step])
    for start in range(step, len(view), step):
        yield encode_chunk(b"", view[start:start + step])


def _read_varint(buf: memoryview, i: int, n: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if i >= n:
            raise InvalidRequest("tensor chunk: truncated varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, i
        shift += 7
        if shift >= 70:
            raise InvalidRequest("tensor chunk: varint longer than 10 bytes")


def _int64(v: int) -> int:
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


def parse_chunk(raw: bytes | memoryview) -> tuple[int, list[int], memoryview, str]:
    """(dtype code, shape, data, ref) of a serialised TensorChunk; `data` is a view into `raw`."""
    buf = memoryview(raw)
    if buf.ndim != 1 or buf.itemsize != 1:
        buf = buf.cast("B")
    n = len(buf)
    i = 0
    dtype, shape, data, ref = 0, [], buf[0:0], ""
    while i < n:
        key, i = _read_varint(buf, i, n)
        field, kind = key >> 3, key & 7
        if field == 0:
            raise InvalidRequest("tensor chunk: field number 0")
        if kind == 0:
            v, i = _read_varint(buf, i, n)
            if field == 1:
                dtype = _int64(v)
            elif field == 2:
                shape.append(_int64(v))
        elif kind == 2:
            length, i = _read_varint(buf, i, n)
            if length > n - i:
                raise InvalidRequest(f"tensor chunk: field {field} runs {length - (n - i)} bytes past the message")
            segment = buf[i:i + length]
            i += length
            if field == 3:
                data = segment
            elif field == 2:  # packed dims
                j = 0
                while j < length:
                    v, j = _read_varint(segment, j, length)
                    shape.append(_int64(v))
            elif field == 4:
                try:
                    ref = str(segment, "utf-8")
                except UnicodeDecodeError:
                    raise InvalidRequest("tensor chunk: ref is not UTF-8") from None
        elif kind == 1:
            i += 8
        elif kind == 5:
            i += 4
        else:
            raise InvalidRequest(f"tensor chunk: field {field} has wire type {kind}, which this message does not use")
        if i > n:
            raise InvalidRequest("tensor chunk: truncated field")
    return dtype, shape, data, ref


class Assembler:
    """Builds one array from the chunks of a stream: validates dtype and shape (element count
    within `limits`, bytes within `max_bytes`) from the first chunk before allocating, copies
    each chunk's data once into the preallocated buffer, and (with `hashing`) computes the
    content id as the bytes arrive."""

    def __init__(self, limits: Limits = DEFAULT_LIMITS, max_bytes: int | None = None, hashing: bool = False,
                 where: str = "tensor", limit_name: str = "the limit", reserve: Callable[[int], None] | None = None):
        """`reserve(nbytes)`, when given, is called once the size is known and before the buffer
        is allocated (it may refuse by raising)."""
        self.limits, self.max_bytes, self.hashing, self.where, self.limit_name = limits, max_bytes, hashing, where, limit_name
        self.reserve = reserve
        self.dtype = ""
        self.shape: tuple[int, ...] = ()
        self.ref = ""
        self.nbytes = self.filled = 0
        self._buf: np.ndarray | None = None
        self._digests: list[bytes] | None = None  # leaves hashed so far, when hashing as the stream arrives

    @property
    def started(self) -> bool:
        return self._buf is not None

    def add(self, raw: bytes | memoryview) -> None:
        code, shape, data, ref = parse_chunk(raw)
        if self._buf is None:
            self._start(code, shape, ref)
        elif code or shape or ref:
            raise InvalidRequest(f"{self.where}: only the first chunk of a stream carries dtype, shape and ref")
        n = len(data)
        if n > self.nbytes - self.filled:
            raise InvalidRequest(f"{self.where}: {type_str(self.dtype, self.shape)} is {self.nbytes} bytes; the chunks "
                                 f"carry more ({self.filled + n} so far)")
        if n:
            assert self._buf is not None
            self._buf[self.filled:self.filled + n] = np.frombuffer(data, np.uint8)
            self.filled += n
            if self._digests is not None:  # hash complete leaves in batches, one leaf per core, while gRPC receives
                done = len(self._digests)
                ready = self.filled // LEAF_BYTES - done
                if ready >= self._batch or (self.filled == self.nbytes and ready):
                    self._digests += leaf_digests(self._buf.data[done * LEAF_BYTES:(done + ready) * LEAF_BYTES])

    def _start(self, code: int, shape: list[int], ref: str) -> None:
        if code not in DTYPE_FROM_PB:
            raise InvalidRequest(f"{self.where}: the first chunk must carry a known dtype, got code {code}")
        self.dtype = DTYPE_FROM_PB[code]
        self.shape = check_shape(shape, self.limits, self.where)
        self.ref = ref
        self.nbytes = math.prod(self.shape) * NP_DTYPES[self.dtype].itemsize
        if self.max_bytes is not None and self.nbytes > self.max_bytes:
            raise LimitError(f"{self.where}: {type_str(self.dtype, self.shape)} takes {self.nbytes} bytes, over "
                             f"{self.limit_name} of {self.max_bytes}")
        if self.reserve is not None:
            self.reserve(self.nbytes)
        self._buf = np.empty(self.nbytes, np.uint8)
        if self.hashing and self.nbytes >= PARALLEL_LEAVES * LEAF_BYTES:
            self._digests = []
            self._batch = max(threads.available_cores(), PARALLEL_LEAVES)

    def finish(self) -> tuple[np.ndarray, str]:
        """The array (read-only, native byte order) and its content id ("" without hashing)."""
        if self._buf is None:
            raise InvalidRequest(f"{self.where}: the stream carried no chunk (the first names dtype and shape)")
        if self.filled != self.nbytes:
            raise InvalidRequest(f"{self.where}: {type_str(self.dtype, self.shape)} needs {self.nbytes} bytes, the "
                                 f"chunks carried {self.filled}")
        if self.dtype == "bool" and self.nbytes and int(self._buf.max()) > 1:
            raise InvalidRequest(f"{self.where}: bool data holds bytes other than 0 and 1")
        a = self._buf.view(WIRE_DTYPES[self.dtype]).reshape(self.shape).astype(NP_DTYPES[self.dtype], copy=False)
        a.flags.writeable = False
        if not self.hashing:
            return a, ""
        view = self._buf.data
        if self._digests is None:
            digests = leaf_digests(view)
        else:
            done = len(self._digests) * LEAF_BYTES
            digests = self._digests + leaf_digests(view[done:])
        return a, combine_id(self.dtype, self.shape, digests)
