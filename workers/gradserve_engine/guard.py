"""What bounds one call while it runs: when to stop, and how much memory it may hold.

The service sets both around each call, as context variables, so they reach whatever runs for
the call without being passed down: `stop_when(check)` (the caller went away, or its deadline
passed) and `within(budget)` (the server's memory limits). Transforms, passes and plan building
poll the stop condition inside their loops (`poller`), plans check it between kernels, and
large kernels between blocks; a plan admits itself to the budget before it runs (`Budget.hold`).
Outside the service (the embedded SDK) neither is set and nothing is checked.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
from collections.abc import Callable, Iterator
from contextvars import ContextVar

import numpy as np

from .errors import Cancelled, LimitError

STOP: ContextVar[Callable[[], bool] | None] = ContextVar("gradserve_stop", default=None)
BUDGET: ContextVar[Budget | None] = ContextVar("gradserve_budget", default=None)
MiB = 1 << 20


@contextlib.contextmanager
def stop_when(check: Callable[[], bool]) -> Iterator[None]:
    """Work run inside stops, raising Cancelled, once `check()` is true (the service passes "the
    client went away or the deadline passed"): plans between kernels and between the blocks of
    a large kernel, transforms and plan building every few hundred nodes."""
    token = STOP.set(check)
    try:
        yield
    finally:
        STOP.reset(token)


def current_stop() -> Callable[[], bool] | None:
    """The stop condition of the call running in this context (None outside the service)."""
    return STOP.get()


def _nothing() -> None:
    return None


def poller(where: str, every: int = 256) -> Callable[[], None]:
    """A function to call once per iteration of a loop whose length the caller chose (nodes of a
    graph, outputs, ...): every `every`-th call it checks the stop condition and raises
    Cancelled saying it stopped `where`. A no-op outside `stop_when`."""
    stop = STOP.get()
    if stop is None:
        return _nothing
    count = itertools.count()

    def poll() -> None:
        if not next(count) % every and stop():
            raise Cancelled(f"stopped {where}")

    return poll


def mib(nbytes: int) -> str:
    return f"{nbytes / MiB:.1f} MiB" if nbytes < 1 << 40 else f"{nbytes / (1 << 40):.1f} TiB"


class Budget:
    """The memory limits of a server's calls: each plan a call runs may need at most
    `max_call_bytes` at its peak (`Plan.peak_bytes`), the plans running at once together at
    most `max_inflight_bytes` (a plan that would go over is refused, not queued: the caller
    retries later), and no tensor a call derives (Jacobian seeds, stacked cotangents, batched
    results, intermediates of a derived graph) more than `max_elements` elements. None: no limit."""

    def __init__(self, max_call_bytes: int | None = None, max_inflight_bytes: int | None = None,
                 max_elements: int | None = None):
        self.max_call_bytes = max_call_bytes
        self.max_inflight_bytes = max_inflight_bytes
        self.max_elements = max_elements
        self.inflight = 0  # bytes held by the plans running now
        self._lock = threading.Lock()

    def check_call(self, nbytes: int, what: Callable[[], str]) -> None:
        if self.max_call_bytes is not None and nbytes > self.max_call_bytes:
            raise LimitError(f"{what()} needs {mib(nbytes)} of memory at its peak, over the limit of "
                             f"{mib(self.max_call_bytes)} per call (--max-call-mib)")

    def acquire(self, nbytes: int, what: Callable[[], str]) -> None:
        """Hold `nbytes` of the in-flight budget (until `release`); LimitError if that is over
        the per-call limit, or if the calls in flight already hold too much."""
        self.check_call(nbytes, what)
        with self._lock:
            if self.max_inflight_bytes is not None and self.inflight + nbytes > self.max_inflight_bytes:
                raise LimitError(f"{what()} needs {mib(nbytes)} of memory, and the calls in flight hold "
                                 f"{mib(self.inflight)} of the server's {mib(self.max_inflight_bytes)} "
                                 "(--max-inflight-mib); retry later")
            self.inflight += nbytes

    def release(self, nbytes: int) -> None:
        with self._lock:
            self.inflight -= nbytes

    @contextlib.contextmanager
    def hold(self, nbytes: int, what: Callable[[], str]) -> Iterator[None]:
        """`acquire` for the duration of the block."""
        self.acquire(nbytes, what)
        try:
            yield
        finally:
            self.release(nbytes)

    def check_elements(self, shape: tuple[int, ...], what: Callable[[], str]) -> None:
        if self.max_elements is not None and math.prod(shape) > self.max_elements:
            raise LimitError(f"{what()} has shape {list(shape)}, more than the limit of {self.max_elements} elements")


@contextlib.contextmanager
def within(budget: Budget | None) -> Iterator[None]:
    """Plans run inside are admitted against `budget` (None: no limits)."""
    token = BUDGET.set(budget)
    try:
        yield
    finally:
        BUDGET.reset(token)


def current_budget() -> Budget | None:
    return BUDGET.get()


def check_derived(shape: tuple[int, ...], dtype: str, what: str) -> None:
    """A tensor a call is about to make that no request declared (e.g. a Jacobian's identity
    seeds): within the element limit and the per-call memory limit of the budget in force."""
    budget = BUDGET.get()
    if budget is None:
        return
    budget.check_elements(shape, lambda: what)
    budget.check_call(math.prod(shape) * np.dtype(dtype).itemsize, lambda: what)
