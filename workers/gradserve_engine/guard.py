"""What bounds one call while it runs: when to stop.

The service sets the stop condition around each call, as a context variable, so it reaches
whatever runs for the call without being passed down: `stop_when(check)` (the caller went away,
or its deadline passed). Transforms, passes and plan building poll it inside their loops
(`poller`), plans check it between kernels, and large kernels between blocks. Outside the service (the embedded SDK) it is
not set and nothing is checked.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from contextvars import ContextVar

from .errors import Cancelled

STOP: ContextVar[Callable[[], bool] | None] = ContextVar("gradserve_stop", default=None)


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

