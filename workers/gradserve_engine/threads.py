"""The CPUs this process may use, and one thread pool sized to them for work that releases the
GIL (hashing, large numpy kernels): shared by the whole process so that parallel pieces never
oversubscribe the machine by starting pools of their own."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def available_cores() -> int:
    """CPUs this process may use: its affinity, capped by a cgroup quota (a container's limit)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(int(int(quota) / int(period)), 1))
    except (OSError, ValueError):
        pass
    return cores


_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def pool() -> ThreadPoolExecutor:
    """The process's pool of `available_cores()` threads (started on first use)."""
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                _pool = ThreadPoolExecutor(max_workers=available_cores(), thread_name_prefix="gradserve-cpu")
    return _pool
