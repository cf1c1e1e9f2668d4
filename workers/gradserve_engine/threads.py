"""The CPUs this process may use, and the one pool of threads that spreads GIL-free work over
them: fused native kernels, large numpy steps, the hashing of large tensors.

One pool for the process, sized to `available_cores()` (affinity and cgroup quota), so that no
part starts threads of its own and oversubscribes the machine. A call splits its work into
chunks; the caller and the pool's workers claim chunks until none are left, and the caller never
waits for a worker that has not started (on a loaded machine a worker can be off the CPU for a
whole time slice: the caller then does the work alone). One call at a time: a caller that finds
the pool busy (another thread's plan) runs its chunks itself, so concurrent plans on a server's
threads never queue behind each other. Plans run their steps one after another, so the pool and
BLAS's own threads take turns rather than compete.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


@functools.cache
def available_cores() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup quota (a container's limit)
    and by OMP_NUM_THREADS when set (what a process's share of a machine is usually given as:
    Ray sets it for each worker, `gradserve serve --processes` for each server); read once."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    share = os.environ.get("OMP_NUM_THREADS", "")
    if share.isdigit() and int(share) > 0:
        cores = min(cores, int(share))
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(int(int(quota) / int(period)), 1))
    except (OSError, ValueError):
        pass
    return cores


class _Job:
    """One call split into chunks, claimed one at a time by whoever is free."""

    def __init__(self, fn: Callable[..., Any], bounds: Sequence[int], args: tuple):
        self.fn, self.bounds, self.args = fn, bounds, args
        self.lock = threading.Lock()
        self.next = 0
        self.running = 0
        self.finished = threading.Event()
        self.error: BaseException | None = None

    def help(self) -> None:
        last = len(self.bounds) - 1
        while True:
            with self.lock:
                i = self.next
                if i >= last:
                    return
                self.next = i + 1
                self.running += 1
            try:
                self.fn(self.bounds[i], self.bounds[i + 1], *self.args)
            except BaseException as e:  # reported to the caller
                self.error = e
            finally:
                with self.lock:
                    self.running -= 1
                    if self.running == 0 and self.next >= last:
                        self.finished.set()

    def wait(self) -> None:
        with self.lock:
            idle = self.running == 0
        if not idle:
            self.finished.wait()
        error = self.error
        if error is not None:
            raise error


class Pool:
    """The caller and `size - 1` daemon workers: `run(fn, bounds, args)` calls
    `fn(bounds[i], bounds[i + 1], *args)` for every i, spread over whoever is free (or, alone,
    `fn(bounds[0], bounds[-1], *args)` once: `fn` takes any range)."""

    def __init__(self, size: int):
        self.size = size
        self.pid = os.getpid()
        self.calls = 0  # calls spread over the pool (the rest ran in their caller alone)
        self._busy = threading.Lock()
        self._wake = threading.Semaphore(0)
        self._job: _Job | None = None
        for i in range(1, size):
            threading.Thread(target=self._work, name=f"gradserve-cpu-{i}", daemon=True).start()

    def _work(self) -> None:
        while True:
            self._wake.acquire()
            job = self._job
            if job is not None:
                job.help()
            job = None  # an idle worker must not keep the last call's arrays alive

    def run(self, fn: Callable[..., Any], bounds: Sequence[int], args: tuple = ()) -> None:
        if self.size == 1 or len(bounds) <= 2 or not self._busy.acquire(blocking=False):
            fn(bounds[0], bounds[-1], *args)
            return
        job = _Job(fn, bounds, args)
        try:
            self.calls += 1
            self._job = job
            for _ in range(self.size - 1):
                self._wake.release()
            job.help()
            job.wait()
        finally:
            self._job = None
            self._busy.release()
            job.args, job.error = (), None  # no cycle through a traceback keeps the operands alive


_pool: Pool | None = None
_pool_lock = threading.Lock()


def pool() -> Pool:
    """The process's pool (started on first use, and again in a forked child: threads do not
    survive fork)."""
    global _pool
    p = _pool
    if p is None or p.pid != os.getpid():
        with _pool_lock:
            p = _pool
            if p is None or p.pid != os.getpid():
                p = _pool = Pool(available_cores())
    return p


def cuts(n: int, chunks: int) -> list[int]:
    """Bounds splitting range(n) into `chunks` near-equal parts."""
    chunks = max(1, min(chunks, n))
    return [n * i // chunks for i in range(chunks + 1)]
