"""A stand-in for CuPy and one CUDA device on the CPU, faithful where the GPU backend's
correctness depends on it. `make()` gives a fresh `cupy` module (the tests put it in
sys.modules, with `cupyx`); `device()` is the device it runs on.

Device memory is bytes. `cuda.Memory(size)` is cudaMalloc: a block of its own, or one freed
before (an address the driver hands out again), and `CUDARuntimeError(errorMemoryAllocation)`
past the device's `capacity` (None: unbounded; a test sets it); a block is freed (cudaFree, which
waits for the device) when its last reference goes. A `MemoryPool` keeps blocks per stream, as
CuPy's pool does: fresh ones filled with 0xFF (memory nobody wrote reads as NaN, or -1), freed
ones holding what they held; a pooled block goes back to its pool when the last array on it goes.
On a failed cudaMalloc the pool frees all its free blocks and tries again, as CuPy's
`_try_malloc` does, then raises `OutOfMemoryError`; `MemoryPool(allocator)` takes the function
that gets memory from the device (`cuda.MemoryPointer(cuda.Memory(size), 0)` by default). An
array is a view (offset, shape, strides, dtype) of a block. A kernel is a numpy function run on
numpy views of its operands' blocks; a result that is not a view of an operand is written into
a new block from the current allocator (`cuda.using_allocator`, else the default pool).

Streams: each thread has a current stream (`with stream:`). While the current stream captures,
a kernel is recorded, not run: it runs on shadow copies of the blocks it touches, so that later
kernels of the capture see the shapes and values they would, while device memory keeps its
bytes; `Graph.launch` runs the recorded kernels on the memory itself, at the addresses they were
recorded with. As in CUDA and CuPy, during a capture: reading device values on the host (`get`,
`asnumpy`, `item`, `bool()`, `float()`), copies from the host, and cuBLAS/cuSOLVER calls (matmul,
dot, linalg) raise without spoiling the capture; synchronizing raises and invalidates it
(`end_capture` then raises). An event recorded on a capturing stream makes a stream that waits
for it join the capture (its work is recorded into it too); the capture ends only once every
stream that joined it was waited for again by the capturing one (else `end_capture` raises, as
cudaErrorStreamCaptureUnjoined).

Work on a stream runs in order; work on two streams is ordered only by an event one recorded and
the other waited for (`wait_event`), or by the host waiting (`synchronize`, a blocking copy to
the host, cudaFree). The legacy default stream's implicit synchronization with other streams is
not modelled (stricter than CUDA: order streams with events).

Sanitizer: a block that a live graph touches must not be handed out again, except to an
allocation made while capturing on that graph's stream (stream order keeps that safe); a block
one stream used must not be handed out again on another stream, nor written on another (or read
there, after a write), before that stream's work is ordered after the use. Each breach is
appended to `violations` (the fixture fails the test on any); the work goes ahead all the same,
so a graph then writes over someone else's array, as on a device. Whether a kernel wrote a block
is seen from its bytes (a write of the same bytes is not seen).

`stats` counts kernels run outside graphs ("kernels"), kernels recorded ("recorded"), copies
between host and device or within the device ("copies"), and graph launches ("launches").

`ElementwiseKernel` evaluates the CUDA body `gpu.elementwise_source` writes (a small C++ subset)
with numpy: it checks what the GPU code says, not how a GPU rounds.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import operator
import re
import threading
import types
import weakref
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
from numpy.lib.mixins import NDArrayOperatorsMixin

stats: Counter = Counter()
violations: list[str] = []
_tls = threading.local()
_graphs: weakref.WeakSet = weakref.WeakSet()  # the live graphs
_streams: weakref.WeakSet = weakref.WeakSet()  # every stream, for a device-wide synchronize
_BLAS = {"matmul", "dot", "vdot", "inner", "tensordot", "einsum"}  # cuBLAS: refused during capture
_D2H = "the current stream is capturing, so D2H transfers are disallowed"  # CuPy's words
_H2D = "the current stream is capturing, so H2D transfers are disallowed"
errorMemoryAllocation = 2  # cudaErrorMemoryAllocation


class CUDARuntimeError(RuntimeError):
    def __init__(self, status: int):
        self.status = status
        super().__init__("cudaErrorMemoryAllocation: out of memory" if status == errorMemoryAllocation
                         else f"CUDA error {status}")


class OutOfMemoryError(MemoryError):
    def __init__(self, size: int, total: int, limit: int = 0):
        super().__init__(f"Out of memory allocating {size:,} bytes (allocated so far: {total:,} bytes).")


# ---------------------------------------------------------------- memory


class _Block:
    """Device memory at one address: its bytes, and the last use of it by each stream (the
    operation's number on that stream), reads and writes apart."""

    __slots__ = ("__weakref__", "raw", "reads", "writes")

    def __init__(self, size: int):
        self.raw = np.full(size, 0xFF, np.uint8)
        self.reads: dict[int, int] = {}
        self.writes: dict[int, int] = {}


def _live_graph_check(block: _Block, size: int, stream: Stream, how: str) -> None:
    for g in list(_graphs):
        if block in g.blocks and not (stream.capture is not None and stream.ptr == g.stream_ptr):
            violations.append(f"a block of {size} bytes that a live CUDA graph uses was handed out again by {how} on "
                              f"stream {stream.ptr}" + (" during a capture" if stream.capture else ""))


class Memory:
    """cudaMalloc'd memory (CuPy's `cuda.Memory`): freed, cudaFree, when collected."""

    def __init__(self, size: int):
        self.size = size
        self.device = _device
        self.block = _device.cuda_malloc(size)
        self.ptr = id(self.block)

    def __del__(self):
        if hasattr(self, "block"):  # not when cudaMalloc failed
            self.device.cuda_free(self.block)


class _PooledMemory:
    """A pool's block in use: back to the pool (the free list of the stream it was allocated on)
    when collected."""

    def __init__(self, pool: MemoryPool, key: tuple[int, int], mem: Memory):
        self.pool, self.key, self.mem = pool, key, mem
        self.block, self.ptr, self.size = mem.block, mem.ptr, key[1]

    def __del__(self):
        self.pool._give_back(self.key, self.mem)


class MemoryPointer:
    """A place in device memory (`ptr`), holding its memory (`mem`)."""

    def __init__(self, mem: Any, offset: int):
        self.mem, self.offset = mem, offset
        self.block: _Block = mem.block
        self.ptr = id(self.block) + offset

    def copy_from_device_async(self, src: MemoryPointer, size: int, stream: Stream | None = None) -> None:
        def copy(dst_buf: np.ndarray, src_buf: np.ndarray) -> None:
            dst_buf[self.offset:self.offset + size] = src_buf[src.offset:src.offset + size]

        s = stream if stream is not None else get_current_stream()
        if s.capture is not None:
            s.capture.memcpy(s, copy, self.block, src.block)
        else:
            stats["copies"] += 1
            _use(s, [src.block], [self.block])
            copy(self.block.raw, src.block.raw)


def _malloc(size: int) -> MemoryPointer:
    return MemoryPointer(Memory(size), 0)


class MemoryPool:
    def __init__(self, allocator: Callable[[int], MemoryPointer] | None = None):
        self._allocator = allocator if allocator is not None else _malloc
        self._free: dict[tuple[int, int], list[Memory]] = {}
        self._total = self._used = 0

    def malloc(self, size: int) -> MemoryPointer:
        size = max(-(-size // 512) * 512, 512)
        stream = get_current_stream()
        key = (stream.ptr, size)
        free = self._free.get(key)
        if free:
            mem = free.pop()
            _live_graph_check(mem.block, size, stream, "an allocation")
            _reuse_check(mem.block, stream)
        else:
            mem = self._try_malloc(size)
        self._used += size
        return MemoryPointer(_PooledMemory(self, key, mem), 0)

    def _try_malloc(self, size: int) -> Memory:
        """cudaMalloc through the allocator; when the device is out of memory, free every free
        block and try again (twice, the second time after a garbage collection), as CuPy does."""
        for attempt in range(3):
            try:
                mem = self._allocator(size).mem
            except CUDARuntimeError as e:
                if e.status != errorMemoryAllocation:
                    raise
                if attempt == 2:
                    raise OutOfMemoryError(size, self._total) from None
                if attempt == 1:
                    gc.collect()
                self.free_all_blocks()
            else:
                self._total += size
                return mem
        raise AssertionError("unreachable")

    def _give_back(self, key: tuple[int, int], mem: Memory) -> None:
        self._used -= key[1]
        self._free.setdefault(key, []).append(mem)

    def used_bytes(self) -> int:
        return self._used

    def total_bytes(self) -> int:
        return self._total

    def free_all_blocks(self, stream: Any = None) -> None:
        for (_, size), mems in list(self._free.items()):
            self._total -= size * len(mems)
        self._free.clear()  # each Memory collected: cudaFree


def alloc(size: int) -> MemoryPointer:
    allocator = getattr(_tls, "allocator", None)
    return (allocator or _device.default_pool.malloc)(size)


@contextlib.contextmanager
def using_allocator(allocator: Callable[[int], MemoryPointer] | None = None):
    previous = getattr(_tls, "allocator", None)
    _tls.allocator = allocator if allocator is not None else MemoryPool().malloc
    try:
        yield
    finally:
        _tls.allocator = previous


# ---------------------------------------------------------------- stream order


def _ordered(stream: Stream, other: int, n: int) -> bool:
    """Whether work now enqueued on `stream` runs after operation `n` of stream `other`."""
    return other == stream.ptr or stream.after.get(other, 0) >= n or _device.done.get(other, 0) >= n


def _use(stream: Stream, reads: Iterable[_Block], writes: Iterable[_Block]) -> None:
    """One operation on `stream` reading and writing these blocks: checked against what other
    streams did with them, then stamped."""
    stream.seq += 1
    writes = set(writes)
    reads = set(reads) - writes
    for block in (*reads, *writes):
        written = block in writes
        for other, n in block.writes.items():
            if not _ordered(stream, other, n):
                violations.append(f"stream {stream.ptr} {'wrote' if written else 'read'} a block of "
                                  f"{block.raw.size} bytes that stream {other} writes, before waiting for that write")
        if written:
            for other, n in block.reads.items():
                if not _ordered(stream, other, n):
                    violations.append(f"stream {stream.ptr} wrote a block of {block.raw.size} bytes that stream "
                                      f"{other} reads, before waiting for that read")
    for block in reads:
        block.reads[stream.ptr] = stream.seq
    for block in writes:
        block.writes[stream.ptr] = stream.seq


def _reuse_check(block: _Block, stream: Stream) -> None:
    """A pool handing `block` out again on `stream`: every use of it elsewhere must be ordered before."""
    for other, n in (*block.reads.items(), *block.writes.items()):
        if not _ordered(stream, other, n):
            violations.append(f"a block of {block.raw.size} bytes that stream {other} may still use was handed out "
                              f"again on stream {stream.ptr}, which never waited for that use")
            return


# ---------------------------------------------------------------- streams and graphs


class Event:
    def __init__(self, block: bool = False, disable_timing: bool = False, interprocess: bool = False):
        self.frontier: dict[int, int] = {}  # per stream, the work done when the event completes
        self.capture: _Capture | None = None  # recorded during this capture
        self.source: Stream | None = None
        self.mark = 0  # the capture's work on the source stream when recorded

    def synchronize(self) -> None:
        for ptr, n in self.frontier.items():
            _device.done[ptr] = max(_device.done.get(ptr, 0), n)


class Stream:
    _ids = itertools.count(2)
    null: Stream

    def __init__(self, null: bool = False, non_blocking: bool = False, ptds: bool = False):
        self.ptr = 0 if null else next(Stream._ids)
        self.capture: _Capture | None = None
        self.seq = 0  # operations enqueued
        self.after: dict[int, int] = {}  # per other stream, the operations this one waits for (events)
        _streams.add(self)

    def __enter__(self) -> Stream:
        _stack().append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _stack().pop()

    def begin_capture(self, mode: Any = None) -> None:
        if self.ptr in (0, 1):
            raise RuntimeError("cannot capture on the default (legacy) stream")
        if self.capture is not None:
            raise RuntimeError("cudaErrorIllegalState: the stream is already capturing")
        self.capture = _Capture(self)

    def end_capture(self) -> Graph:
        cap = self.capture
        if cap is None or cap.stream is not self:
            raise RuntimeError("cudaErrorIllegalState: the stream is not capturing" if cap is None else
                               "cudaErrorStreamCaptureUnmatched: the capture was not begun on this stream")
        for s in cap.forks:
            s.capture = None
        self.capture = None
        cap.open = False
        if any(cap.joined.get(s.ptr, -1) < cap.work.get(s.ptr, 0) for s in cap.forks):
            cap.invalid = cap.invalid or "cudaErrorStreamCaptureUnjoined: a stream that joined the capture was not joined back"
        if cap.invalid:
            raise RuntimeError(f"cudaErrorStreamCaptureInvalidated: {cap.invalid}")
        return Graph(cap)

    def is_capturing(self) -> bool:
        return self.capture is not None

    def synchronize(self) -> None:
        if self.capture is not None:
            self.capture.invalid = "cudaStreamSynchronize during capture"
            raise RuntimeError("cudaErrorStreamCaptureUnsupported: operation not permitted when stream is capturing")
        _device.done[self.ptr] = max(_device.done.get(self.ptr, 0), self.seq)
        for ptr, n in self.after.items():
            _device.done[ptr] = max(_device.done.get(ptr, 0), n)

    def record(self, event: Event | None = None) -> Event:
        event = event if event is not None else Event()
        event.frontier = {**self.after, self.ptr: self.seq}
        event.capture, event.source = self.capture, self
        event.mark = self.capture.work.get(self.ptr, 0) if self.capture is not None else 0
        return event

    def wait_event(self, event: Event) -> None:
        for ptr, n in event.frontier.items():
            self.after[ptr] = max(self.after.get(ptr, 0), n)
        cap = event.capture
        if cap is not None and cap.open:
            if self.capture is None:  # joins the capture
                self.capture = cap
                cap.forks.add(self)
            elif self is cap.stream and event.source is not None:  # a stream that joined, joined back
                cap.joined[event.source.ptr] = event.mark


Stream.null = Stream(null=True)


def _stack() -> list[Stream]:
    stack = getattr(_tls, "streams", None)
    if stack is None:
        stack = _tls.streams = []
    return stack


def get_current_stream() -> Stream:
    stack = _stack()
    return stack[-1] if stack else Stream.null


def _capturing() -> _Capture | None:
    return get_current_stream().capture


class _Geom:
    """An array's place in memory without its ownership: what a recorded kernel holds (a graph
    holds addresses, not the arrays)."""

    __slots__ = ("block", "dtype", "offset", "shape", "strides")

    def __init__(self, block: _Block, offset: int, shape: tuple, strides: tuple, dtype: np.dtype):
        self.block, self.offset, self.shape, self.strides, self.dtype = block, offset, shape, strides, dtype

    def on(self, buf: np.ndarray) -> np.ndarray:
        return np.ndarray(self.shape, self.dtype, buffer=buf, offset=self.offset, strides=self.strides)


class _Capture:
    def __init__(self, stream: Stream):
        self.stream = stream  # the stream it was begun on
        self.records: list[Callable[[], None]] = []
        self.blocks: set[_Block] = set()
        self.shadows: dict[int, np.ndarray] = {}
        self.invalid = ""
        self.open = True
        self.forks: set[Stream] = set()  # streams that joined it (waited for an event recorded in it)
        self.work: dict[int, int] = {}  # per stream, the operations recorded from it
        self.joined: dict[int, int] = {}  # per stream that joined, its work the capturing stream waited for

    def shadow(self, block: _Block) -> np.ndarray:
        self.blocks.add(block)
        buf = self.shadows.get(id(block))
        if buf is None:
            buf = self.shadows[id(block)] = block.raw.copy()
        return buf

    def kernel(self, fn: Callable[..., Any], args: Any, kwargs: Any, news: list[tuple[int | None, _Geom]]) -> None:
        def replay() -> None:
            res = fn(*_materialize(args), **_materialize(kwargs))
            for path, geom in news:
                np.copyto(geom.on(geom.block.raw), res if path is None else res[path])

        stats["recorded"] += 1
        self._record(get_current_stream(), replay)

    def memcpy(self, stream: Stream, copy: Callable[[np.ndarray, np.ndarray], None], dst: _Block, src: _Block) -> None:
        copy(self.shadow(dst), self.shadow(src))
        self._record(stream, lambda: copy(dst.raw, src.raw))

    def _record(self, stream: Stream, replay: Callable[[], None]) -> None:
        self.work[stream.ptr] = self.work.get(stream.ptr, 0) + 1
        self.records.append(replay)


class Graph:
    def __init__(self, cap: _Capture):
        self.records = cap.records
        self.blocks = cap.blocks
        self.stream_ptr = cap.stream.ptr
        _graphs.add(self)

    def launch(self, stream: Stream | None = None) -> None:
        s = stream if stream is not None else get_current_stream()
        if s.capture is not None:
            raise RuntimeError("a graph launched into a capture (not modelled)")
        stats["launches"] += 1
        before = {b: b.raw.copy() for b in self.blocks}
        with np.errstate(all="ignore"):
            for replay in self.records:
                replay()
        _use(s, self.blocks, [b for b, raw in before.items() if not np.array_equal(raw, b.raw)])


def _materialize(obj: Any) -> Any:
    if isinstance(obj, _Geom):
        return obj.on(obj.block.raw)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_materialize(o) for o in obj)
    if isinstance(obj, dict):
        return {k: _materialize(v) for k, v in obj.items()}
    return obj


# ---------------------------------------------------------------- arrays and kernels


class ndarray(NDArrayOperatorsMixin):  # CuPy's name
    __array_priority__ = 100

    def __init__(self, mem: MemoryPointer, shape: tuple, dtype: Any, strides: tuple | None = None):
        self.mem = mem
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.strides = strides if strides is not None else _c_strides(self.shape, self.dtype.itemsize)

    # what a kernel sees
    def _geom(self) -> _Geom:
        return _Geom(self.mem.block, self.mem.offset, self.shape, self.strides, self.dtype)

    def _on(self, buf: np.ndarray) -> np.ndarray:
        return self._geom().on(buf)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def flags(self) -> Any:
        return self._on(self.mem.block.raw).flags

    @property
    def data(self) -> MemoryPointer:
        return self.mem

    @property
    def T(self) -> ndarray:
        return self.transpose()

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"<device array {self.dtype}{list(self.shape)}>"

    # the host: explicit copies only, never during a capture
    def __array__(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise TypeError("Implicit conversion to a NumPy array is not allowed. Please use `.get()` to construct a NumPy "
                        "array explicitly.")

    def get(self, stream: Stream | None = None, order: str = "C", out: Any = None, blocking: bool = True) -> np.ndarray:
        s = stream if stream is not None else get_current_stream()
        if s.capture is not None:
            raise RuntimeError(_D2H)
        stats["copies"] += 1
        _use(s, [self.mem.block], [])
        s.synchronize()  # the host waits for the copy, so for the stream's work before it
        return self._on(self.mem.block.raw).copy()

    def set(self, arr: np.ndarray, stream: Stream | None = None) -> None:
        if not isinstance(arr, np.ndarray):
            raise TypeError("Only numpy.ndarray can be set to cupy.ndarray")
        if self.dtype != arr.dtype:
            raise TypeError(f"{arr.dtype} array cannot be set to {self.dtype} array")
        if self.shape != arr.shape:
            raise ValueError(f"Shape mismatch. Old shape: {self.shape}, new shape: {arr.shape}")
        s = stream if stream is not None else get_current_stream()
        if s.capture is not None:
            raise RuntimeError(_H2D)
        stats["copies"] += 1
        _use(s, [], [self.mem.block])
        np.copyto(self._on(self.mem.block.raw), arr)

    def item(self) -> Any:
        return self.get().item()

    def tolist(self) -> Any:
        return self.get().tolist()

    def __bool__(self) -> bool:
        return bool(self.get())

    def __float__(self) -> float:
        return float(self.get())

    def __int__(self) -> int:
        return int(self.get())

    def __index__(self) -> int:
        return operator.index(self.get())

    # kernels
    def copy(self, order: str = "C") -> ndarray:
        return _kernel(np.array, (self,), {"copy": True}, "copy")

    def __getitem__(self, key: Any) -> Any:
        return _kernel(operator.getitem, (self, key), {})

    def __setitem__(self, key: Any, value: Any) -> None:
        _kernel(operator.setitem, (self, key, value), {})

    def __array_ufunc__(self, ufunc: np.ufunc, method: str, *inputs: Any, **kwargs: Any) -> Any:
        return _kernel(getattr(ufunc, method), inputs, kwargs, "blas" if ufunc.__name__ in _BLAS else "kernel")

    def __array_function__(self, func: Any, types_: Any, args: Any, kwargs: Any) -> Any:
        return _kernel(func, args, kwargs, "blas" if func.__name__ in _BLAS else "kernel")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or not callable(getattr(np.ndarray, name, None)):
            raise AttributeError(f"device arrays have no attribute {name!r}")
        return lambda *a, **k: _kernel(_method(name), (self, *a), k, "blas" if name in _BLAS else "kernel")


def _c_strides(shape: tuple, itemsize: int) -> tuple:
    strides, step = [], itemsize
    for d in reversed(shape):
        strides.append(step)
        step *= max(d, 1)
    return tuple(reversed(strides))


_methods: dict[str, Callable[..., Any]] = {}


def _method(name: str) -> Callable[..., Any]:
    fn = _methods.get(name)
    if fn is None:
        fn = _methods[name] = lambda x, *a, **k: getattr(x, name)(*a, **k)
    return fn


def _kernel(fn: Callable[..., Any], args: Any, kwargs: Any, kind: str = "kernel") -> Any:
    """Run (or, while capturing, record) `fn` over the device arrays among args and kwargs."""
    cap = _capturing()
    if cap is not None and kind == "blas":
        raise NotImplementedError("calling cuBLAS API during stream capture is currently unsupported")
    seen: dict[int, tuple[ndarray, np.ndarray]] = {}  # id(block) -> (an operand on it, the buffer it was read from)

    def view(a: ndarray) -> np.ndarray:
        buf = cap.shadow(a.mem.block) if cap is not None else a.mem.block.raw
        seen.setdefault(id(a.mem.block), (a, buf))
        return a._on(buf)

    nargs, nkwargs = _unwrap(args, view), _unwrap(kwargs, view)
    before = {} if cap is not None else {a.mem.block: buf.copy() for a, buf in seen.values()}
    with np.errstate(all="ignore"):
        res = fn(*nargs, **nkwargs)
    news: list[tuple[int | None, _Geom]] = []
    operands = [a for a, _ in seen.values()]
    if isinstance(res, tuple):
        out: Any = tuple(_wrap(r, k, seen, operands, news, cap) for k, r in enumerate(res))
    else:
        out = _wrap(res, None, seen, operands, news, cap)
    if not seen and not news:  # a host helper (result_type, broadcast_shapes): no device work
        return out
    if cap is not None:
        cap.kernel(fn, _unwrap(args, ndarray._geom), _unwrap(kwargs, ndarray._geom), news)
    else:
        stats["copies" if kind == "copy" else "kernels"] += 1
        written = [b for b, raw in before.items() if not np.array_equal(raw, b.raw)]
        _use(get_current_stream(), before, written + [g.block for _, g in news])
    return out


def _unwrap(obj: Any, view: Callable[[ndarray], Any]) -> Any:
    if isinstance(obj, ndarray):
        return view(obj)
    if isinstance(obj, np.ndarray):
        raise TypeError(f"Unsupported type {type(obj)}")  # CuPy refuses host arrays in kernels
    if isinstance(obj, (tuple, list)):
        return type(obj)(_unwrap(o, view) for o in obj)
    if isinstance(obj, dict):
        return {k: _unwrap(v, view) for k, v in obj.items()}
    return obj


def _wrap(res: Any, path: int | None, seen: dict[int, tuple[ndarray, np.ndarray]], operands: list[ndarray],
          news: list[tuple[int | None, _Geom]], cap: _Capture | None) -> Any:
    """A kernel's numpy result as a device array: a view of an operand's block, or a new block."""
    if isinstance(res, np.generic):
        res = np.asarray(res)
    if not isinstance(res, np.ndarray):
        return res
    ptr = res.__array_interface__["data"][0]
    for a, buf in seen.values():
        base = buf.__array_interface__["data"][0]
        if res.size and 0 <= ptr - base < buf.size:
            mem = MemoryPointer(a.mem.mem, ptr - base)
            for b in operands:  # the very operand (out=, astype(copy=False)): itself, as numpy and CuPy give it
                if b.mem.block is mem.block and b.mem.offset == mem.offset and (b.shape, b.strides, b.dtype) == (
                        res.shape, res.strides, res.dtype):
                    return b
            return ndarray(mem, res.shape, res.dtype, res.strides)
    new = ndarray(alloc(res.nbytes), res.shape, res.dtype)
    np.copyto(new._on(cap.shadow(new.mem.block) if cap is not None else new.mem.block.raw), res)
    news.append((path, new._geom()))
    return new


def _upload(a: Any, dtype: Any = None) -> ndarray:
    if _capturing() is not None:
        raise RuntimeError(_H2D)
    host = np.asarray(a, dtype=dtype)
    out = ndarray(alloc(host.nbytes), host.shape, host.dtype)
    stats["copies"] += 1
    _use(get_current_stream(), [], [out.mem.block])
    np.copyto(out._on(out.mem.block.raw), host)
    return out


def asarray(a: Any, dtype: Any = None, order: Any = None) -> ndarray:
    if isinstance(a, ndarray):
        return a if dtype is None or np.dtype(dtype) == a.dtype else a.astype(dtype)
    return _upload(a, dtype)


def array(obj: Any, dtype: Any = None, copy: bool = True, **kwargs: Any) -> ndarray:
    if isinstance(obj, ndarray):
        return obj.astype(dtype if dtype is not None else obj.dtype, copy=copy)
    return _upload(obj, dtype)


def asnumpy(a: Any, stream: Stream | None = None, order: str = "C", out: Any = None, *, blocking: bool = True) -> np.ndarray:
    return a.get(stream=stream) if isinstance(a, ndarray) else np.asarray(a)


def empty(shape: Any, dtype: Any = float, order: str = "C") -> ndarray:
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    dt = np.dtype(dtype)
    return ndarray(alloc(int(np.prod(shape, dtype=np.int64)) * dt.itemsize), shape, dt)


def empty_like(a: ndarray, dtype: Any = None, **kwargs: Any) -> ndarray:
    return empty(a.shape, dtype if dtype is not None else a.dtype)


class _Ufunc:
    """A numpy ufunc over device arrays, with its methods (`at`, `reduce`, ...)."""

    def __init__(self, uf: np.ufunc):
        self.uf = uf
        self.kind = "blas" if uf.__name__ in _BLAS else "kernel"

    def __call__(self, *a: Any, **k: Any) -> Any:
        return _kernel(self.uf, a, k, self.kind)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.uf, name)
        if name in ("at", "reduce", "accumulate", "outer", "reduceat"):
            return lambda *a, **k: _kernel(attr, a, k, self.kind)
        return attr


def _function(fn: Callable[..., Any], kind: str) -> Callable[..., Any]:
    def call(*a: Any, **k: Any) -> Any:
        return _kernel(fn, a, k, kind)

    call.__name__ = getattr(fn, "__name__", "function")
    return call


def _namespace(mod: Any, name: str, blas: bool) -> types.ModuleType:
    ns = types.ModuleType(name)
    for attr in dir(mod):
        if attr.startswith("_"):
            continue
        obj = getattr(mod, attr)
        if isinstance(obj, np.ufunc):
            ns.__dict__[attr] = _Ufunc(obj)
        elif callable(obj) and not isinstance(obj, type):
            ns.__dict__[attr] = _function(obj, "blas" if blas or attr in _BLAS else "kernel")
        elif not isinstance(obj, types.ModuleType):
            ns.__dict__[attr] = obj  # dtypes, constants
    return ns


# ---------------------------------------------------------------- elementwise kernels: the CUDA body in numpy

_C_TYPES = {"bool": np.bool_, "int": np.int32, "long long": np.int64, "float": np.float32, "double": np.float64}
# C's math functions by their numpy names, where the two differ
_C_NAMES = {"fabs": "abs", "pow": "power", "atan": "arctan", "asin": "arcsin", "acos": "arccos", "atan2": "arctan2",
            "asinh": "arcsinh", "acosh": "arccosh", "atanh": "arctanh"}


def _integral(v: Any) -> bool:
    return np.asarray(v).dtype.kind in "iub"


class _CExpr:
    """Recursive descent over ternary, ||, comparisons, + -, * /, unary -, casts, calls."""

    def __init__(self, text: str, env: dict):
        self.toks = re.findall(r"long long|\|\||[<>=!]=|[A-Za-z_]\w*|\d+\.?\d*(?:e[-+]?\d+)?|\S", text)
        self.i, self.env = 0, env

    def peek(self) -> str | None:
        return self.toks[self.i] if self.i < len(self.toks) else None

    def take(self, want: str | None = None) -> str:
        tok = self.toks[self.i]
        assert want is None or tok == want, (want, tok, self.toks)
        self.i += 1
        return tok

    def ternary(self) -> Any:
        c = self.logic_or()
        if self.peek() == "?":
            self.take("?")
            a = self.ternary()
            self.take(":")
            b = self.ternary()
            return np.where(c, a, b)
        return c

    def logic_or(self) -> Any:
        v = self.compare()
        while self.peek() == "||":
            self.take()
            v = np.logical_or(v, self.compare())
        return v

    def compare(self) -> Any:
        v = self.additive()
        ops = {"<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal, "==": np.equal,
               "!=": np.not_equal}
        if self.peek() in ops:
            v = ops[self.take()](v, self.additive())
        return v

    def additive(self) -> Any:
        v = self.multiplicative()
        while self.peek() in ("+", "-"):
            v = np.add(v, self.multiplicative()) if self.take() == "+" else np.subtract(v, self.multiplicative())
        return v

    def multiplicative(self) -> Any:
        v = self.unary()
        while self.peek() in ("*", "/", "%"):
            op = self.take()
            w = self.unary()
            if op == "*":
                v = np.multiply(v, w)
            elif op == "%":  # C's remainder takes the dividend's sign, as fmod
                v = np.fmod(v, w)
            elif _integral(v) and _integral(w):  # C's integer division truncates
                v = (v - np.fmod(v, w)) // np.where(w == 0, 1, w)
            else:
                v = np.divide(v, w)
        return v

    def unary(self) -> Any:
        if self.peek() == "-":
            self.take()
            return np.negative(self.unary())
        if self.peek() == "(" and self.toks[self.i + 1] in _C_TYPES and self.toks[self.i + 2] == ")":
            self.take("(")
            t = _C_TYPES[self.take()]
            self.take(")")
            return np.asarray(self.unary()).astype(t)
        return self.primary()

    def primary(self) -> Any:
        tok = self.take()
        if tok == "(":
            v = self.ternary()
            self.take(")")
            return v
        if self.peek() == "(":  # a call of a C math function
            self.take("(")
            args = [self.ternary()]
            while self.peek() == ",":
                self.take()
                args.append(self.ternary())
            self.take(")")
            return getattr(np, _C_NAMES.get(tok, tok))(*args)
        if tok[0].isdigit():
            return float(tok) if "." in tok or "e" in tok else int(tok)
        return self.env[tok]


class ElementwiseKernel:
    """CuPy's elementwise kernel: the body evaluated with numpy, outputs always passed in (as
    gpu.py does), broadcast as CuPy broadcasts."""

    def __init__(self, in_params: str, out_params: str, body: str, name: str):
        self.ins = [p.split()[1] for p in in_params.split(", ")] if in_params else []
        self.outs = [p.split()[1] for p in out_params.split(", ")]
        self.body = body
        assert name.isidentifier()

    def _numpy(self, *arrays: np.ndarray) -> Any:
        ins, outs = arrays[:len(self.ins)], arrays[len(self.ins):]
        assert len(outs) == len(self.outs), "outputs are always passed in"
        env = dict(zip(self.ins, ins, strict=True))
        for line in self.body.splitlines():
            lhs, rhs = line.rstrip(";").split(" = ", 1)
            name = lhs.split()[-1]
            value = _CExpr(rhs, env).ternary()
            if lhs.startswith("const "):
                env[name] = np.asarray(value).astype(_C_TYPES[lhs[6:].rsplit(" ", 1)[0]])
            else:
                out = outs[self.outs.index(name)]
                np.copyto(out, np.broadcast_to(value, out.shape), casting="unsafe")
        return outs[0] if len(outs) == 1 else tuple(outs)

    def __call__(self, *arrays: Any) -> Any:
        return _kernel(self._numpy, arrays, {})


# ---------------------------------------------------------------- the modules


class _Device:
    """The device: cudaMalloc and cudaFree over a `capacity` (bytes; None: unbounded), and the
    work of each stream known to be done (the host waited for it)."""

    def __init__(self):
        self.capacity: int | None = None
        self.in_use = 0  # bytes cudaMalloc'd and not freed
        self.released: list[_Block] = []  # freed blocks, the most recent first: their addresses are handed out again
        self.done: dict[int, int] = {}
        self.default_pool = MemoryPool()

    def cuda_malloc(self, size: int) -> _Block:
        # the first freed block large enough: the same address handed out again
        block = next((b for b in self.released if b.raw.size >= size), None)
        need = block.raw.size if block is not None else size
        if self.capacity is not None and self.in_use + need > self.capacity:
            raise CUDARuntimeError(errorMemoryAllocation)
        if block is None:
            block = _Block(size)
        else:
            self.released.remove(block)
            _live_graph_check(block, size, get_current_stream(), "cudaMalloc")
        self.in_use += need
        return block

    def cuda_free(self, block: _Block) -> None:
        self.synchronize()  # cudaFree waits for the device
        self.in_use -= block.raw.size
        self.released.insert(0, block)

    def synchronize(self) -> None:
        for s in list(_streams):
            self.done[s.ptr] = max(self.done.get(s.ptr, 0), s.seq)


_device = _Device()


def device() -> _Device:
    """The device the stand-in `cupy` from the last `make()` runs on."""
    return _device


def _device_synchronize() -> None:
    if get_current_stream().capture is not None:
        get_current_stream().synchronize()  # refused, and spoils the capture
    _device.synchronize()


def make() -> tuple[types.ModuleType, types.ModuleType]:
    """(a fresh `cupy`, its `cupyx`): a new device (default pool, counters, sanitizer record)."""
    global _device
    _device = _Device()
    stats.clear()
    violations.clear()
    cp = _namespace(np, "cupy", blas=False)
    cp.linalg = _namespace(np.linalg, "cupy.linalg", blas=True)  # cuSOLVER / cuBLAS
    cp.__dict__.update(ndarray=ndarray, asarray=asarray, array=array, asnumpy=asnumpy, empty=empty,
                       empty_like=empty_like, ElementwiseKernel=ElementwiseKernel, __version__="stand-in",
                       get_default_memory_pool=lambda: _device.default_pool)
    cp.cuda = types.SimpleNamespace(
        Stream=Stream, Event=Event, Graph=Graph, MemoryPool=MemoryPool, MemoryPointer=MemoryPointer, Memory=Memory,
        alloc=alloc, using_allocator=using_allocator, get_current_stream=get_current_stream,
        memory=types.SimpleNamespace(OutOfMemoryError=OutOfMemoryError),
        runtime=types.SimpleNamespace(getDeviceCount=lambda: 1, getDeviceProperties=lambda i: {"name": b"numpy stand-in"},
                                      deviceSynchronize=_device_synchronize, CUDARuntimeError=CUDARuntimeError,
                                      errorMemoryAllocation=errorMemoryAllocation))
    cpx = types.ModuleType("cupyx")
    cpx.scatter_add = _function(np.add.at, "kernel")
    return cp, cpx
