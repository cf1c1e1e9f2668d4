"""The exceptions users see. Each carries one clear message naming the node or argument."""

from __future__ import annotations


class GraphError(ValueError):
    """A graph is malformed: unknown op, bad arity or attribute, cycle, over a limit, ..."""


class ShapeError(GraphError):
    """Shapes or dtypes of a node's operands do not agree with its op."""


class LimitError(GraphError):
    """A graph or tensor is over a configured size limit (the service answers RESOURCE_EXHAUSTED)."""


class Cancelled(RuntimeError):
    """A computation stopped between kernels because its caller went away or ran out of time."""


class ShardError(GraphError):
    """The graph mixes examples along the batch axis, so it cannot be split across workers."""
