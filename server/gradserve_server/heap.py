"""glibc's heap, the two places the server tunes it (no-ops where libc is not glibc).

The engine needs neither: a plan's large results come from its own recycled buffers
(`gradserve_engine.buffers`), so an SDK process computes at steady state without page faults
and without any allocator setting. The server's RPC path is different: each call's request and
response messages are allocated by gRPC and protobuf, and with glibc's defaults the server
threads' arenas map those afresh (and fault them in) call after call.
"""

from __future__ import annotations

import ctypes

try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL("libc.so.6")
except OSError:
    _LIBC = None

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # mallopt's parameters (malloc.h)
ARENAS = 2


def keep_freed_buffers() -> None:
    """Serve large allocations from the heap and keep freed ones for reuse instead of mapping
    fresh pages for each, in at most ARENAS arenas: a thread's own arena grows in heaps of at most
    64 MiB, and one that a large message outgrows is mapped afresh and unmapped again at each call.
    Measured on the float64 MLP gradient (7 MiB of parameters, 1.6 MiB of data, 7 MiB of gradients
    answered), minor page faults per call of the server: with the parameters and data put on the
    server, 2.8 with the thresholds and 11,900 without; sent inline with each call (16.5 MiB
    requests), 10,400 with the thresholds alone and 130 with the arenas bounded too. Call it
    before the server starts its threads."""
    if _LIBC is not None:
        _LIBC.mallopt(M_MMAP_THRESHOLD, 256 << 20)
        _LIBC.mallopt(M_TRIM_THRESHOLD, 512 << 20)
        _LIBC.mallopt(M_ARENA_MAX, ARENAS)


def trim() -> None:
    """Hand the free memory of every malloc arena back to the OS (after a job ended: its
    arguments and state are tens of MiB that the arenas would otherwise keep)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
