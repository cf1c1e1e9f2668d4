"""The exceptions users see. Each carries one clear message naming the node or argument."""

from __future__ import annotations


class GraphError(ValueError):
    """A graph is malformed: unknown op, bad arity or attribute, cycle, over a limit, ..."""


class ShapeError(GraphError):
    """Shapes or dtypes of a node's operands do not agree with its op."""
