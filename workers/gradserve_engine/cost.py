"""Cost model: FLOPs and bytes per node, for the scheduler's choice of execution mode and the partitioner."""

from __future__ import annotations

import math

import numpy as np

from .ir import Graph, Node
from .ops import PRIMITIVES


def node_flops(graph: Graph, n: Node) -> float:
    """Floating-point operations of one node, by its primitive's rule (a transcendental counts as 10)."""
    return PRIMITIVES[n.op].flops([graph.aval(i) for i in n.inputs], (n.dtype, n.shape), n.attrs)


def node_bytes(n: Node) -> int:
    return math.prod(n.shape) * np.dtype(n.dtype).itemsize


def graph_flops(graph: Graph) -> float:
    return sum(node_flops(graph, n) for n in graph.nodes)
