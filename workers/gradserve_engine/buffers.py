"""Large result buffers recycled: a buffer comes back for reuse when the last array over it dies.

A plan's steps allocate their large results afresh on every call; the allocator hands memory
that large back to the OS when it is freed (or maps it fresh), so each call page-faulted its
buffers anew: a float64 MLP gradient took about 4,000 minor faults per call. Steps that write
`out=` take their buffers from here instead. Each buffer is handed out behind a small owner
object that every view of the array keeps alive (numpy's `.base` chain); when the caller, or the
plan's own slot, drops the last of them, the memory goes back on a free list, kept up to
`MAX_FREE_BYTES`, and the next call of the same size reuses it with its pages already mapped.
Nothing is process-global: no allocator setting changes.
"""

from __future__ import annotations

import ctypes
import math
import threading
import weakref
from collections import deque
from typing import Any

import numpy as np

MIN_BYTES = 1 << 18  # smaller buffers come from malloc's heap without faults anyway
MAX_FREE_BYTES = 256 << 20  # free memory kept for reuse, at most


class Recycler:
    """Buffers by size: `empty(shape, dtype)` like `np.empty`, from a free buffer when one fits."""

    def __init__(self, max_free_bytes: int = MAX_FREE_BYTES):
        self.max_free_bytes = max_free_bytes
        self.free_bytes = 0
        self.reused = self.allocated = 0
        self._free: dict[int, list[np.ndarray]] = {}
        self._owners: dict[int, Any] = {}  # nbytes -> the ctypes array type over that many bytes
        self._lock = threading.Lock()
        # buffers given back, not yet on the free lists: a finalizer may run inside any code (the
        # cyclic collector), even in this class holding the lock, so giving back takes no lock
        self._returned: deque[np.ndarray] = deque()

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        count = math.prod(shape)
        nbytes = count * dtype.itemsize
        with self._lock:
            self._file_returned()
            free = self._free.get(nbytes)
            raw = free.pop() if free else None
            if raw is not None:
                self.free_bytes -= nbytes
                self.reused += 1
            else:
                self.allocated += 1
            owner_type = self._owners.get(nbytes)
        if raw is None:
            raw = np.empty(nbytes, np.uint8)
        if owner_type is None:
            owner_type = ctypes.c_byte * nbytes
            with self._lock:
                if len(self._owners) > 1024:
                    self._owners.clear()
                self._owners[nbytes] = owner_type
        owner: Any = owner_type.from_buffer(raw.data)  # every view of the result keeps this alive
        weakref.finalize(owner, self._give_back, raw).atexit = False
        return np.frombuffer(owner, dtype, count).reshape(shape)

    def _give_back(self, raw: np.ndarray) -> None:
        self._returned.append(raw)  # atomic; filed by the next empty()

    def _file_returned(self) -> None:
        """Move the buffers given back onto the free lists, up to the bound (the lock is held)."""
        while self._returned:
            raw = self._returned.popleft()
            if self.free_bytes + raw.nbytes <= self.max_free_bytes:
                self._free.setdefault(raw.nbytes, []).append(raw)
                self.free_bytes += raw.nbytes

    @property
    def held_bytes(self) -> int:
        """Bytes of free buffers kept (filed or just given back)."""
        return self.free_bytes + sum(raw.nbytes for raw in list(self._returned))

    def clear(self) -> None:
        """Let the free buffers go."""
        with self._lock:
            self._returned.clear()
            self._free.clear()
            self.free_bytes = 0


RECYCLER = Recycler()
