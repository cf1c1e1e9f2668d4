"""The exceptions users see, one family. Each carries one clear message naming the node or argument.

Every class names, in `code`, the gRPC status the service answers it with (the status NAME, so
this module needs no grpc: the servicer looks it up as `grpc.StatusCode[exc.code]`). Anything
raised that is not of this family is a bug, and the service answers it INTERNAL.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np


class GradserveError(Exception):
    """The root of the family; raise one of its subclasses."""

    code: ClassVar[str] = "UNKNOWN"


class InvalidRequest(GradserveError, ValueError):
    """A request is wrong: bytes that do not parse, a field out of range, a name it does not have."""

    code = "INVALID_ARGUMENT"


class GraphError(InvalidRequest):
    """A graph is malformed, or a request does not fit it: unknown op, bad arity or attribute,
    cycle, an input or output name it does not have, ..."""


class ShapeError(GraphError):
    """Shapes or dtypes of a node's operands (or of a request's values) do not agree with the graph."""


class LimitError(GraphError):
    """A graph or tensor is over a configured size limit."""

    code = "RESOURCE_EXHAUSTED"


class ShardError(GraphError):
    """The graph mixes examples along the batch axis, so it cannot be split across workers."""


class LinAlgError(InvalidRequest, np.linalg.LinAlgError):
    """A linear-algebra kernel met values it has no answer for: a singular matrix to solve with or
    invert, a matrix that is not positive definite for a Cholesky factor (numpy's LinAlgError, so
    `except np.linalg.LinAlgError` catches it too)."""


class NotFound(GradserveError):
    """An unknown graph id, residual handle or job (or one released, evicted or damaged)."""

    code = "NOT_FOUND"


class TensorNotFound(NotFound):
    """A tensor reference the store does not hold (never put, released, expired or evicted);
    `refs` are the missing ids, which the service also sends in the trailing metadata
    `gradserve-missing-tensors`, so a client can upload them again and retry."""

    def __init__(self, message: str, refs: tuple[str, ...] = ()):
        super().__init__(message)
        self.refs = tuple(refs)


class Cancelled(GradserveError, RuntimeError):
    """A computation stopped between kernels because its caller went away or ran out of time
    (the service answers DEADLINE_EXCEEDED instead when the call's deadline has passed)."""

    code = "CANCELLED"


class WorkersUnavailable(GradserveError, RuntimeError):
    """No worker answered within the call's deadline."""

    code = "UNAVAILABLE"


class StoreError(GradserveError, RuntimeError):
    """The job store cannot be used as it is (damaged, or written by another schema version):
    the server refuses to start on it rather than reset it."""

    code = "FAILED_PRECONDITION"


class StoreUnavailable(StoreError):
    """The job store cannot be written now (locked by another process, e.g. a backup or VACUUM,
    past the busy timeout; disk full; I/O error): retry later."""

    code = "UNAVAILABLE"


class FailedPrecondition(GradserveError, RuntimeError):
    """The request does not apply to the resource as it is now (e.g. deleting a job that is still
    running): the message says what to change first (cancel it), then the request can be retried."""

    code = "FAILED_PRECONDITION"


class Overloaded(GradserveError, RuntimeError):
    """The server is at a configured limit of calls that wait (e.g. WatchJob streams): retry later."""

    code = "RESOURCE_EXHAUSTED"


FAMILY: tuple[type[GradserveError], ...] = (GradserveError, InvalidRequest, GraphError, ShapeError, LimitError, ShardError,
                                            LinAlgError, NotFound, TensorNotFound, Cancelled, WorkersUnavailable,
                                            StoreError, StoreUnavailable, FailedPrecondition, Overloaded)
BY_NAME: dict[str, type[GradserveError]] = {cls.__name__: cls for cls in FAMILY}
