"""Cost model: FLOPs and bytes per node, for the scheduler's choice of execution mode."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from gradserve_engine.ir import Graph, Node

from .kernels import VIEWS

_TRANSCENDENTAL = frozenset({"exp", "log", "log1p", "expm1", "sin", "cos", "tan", "tanh", "logistic", "pow", "atan2"})


def node_flops(graph: Graph, n: Node) -> float:
    """Floating-point operations of one node (a transcendental counts as 10)."""
    out = math.prod(n.shape)
    if n.op in VIEWS:
        return 0.0  # views move no data
    if n.op == "matmul":
        a, b = graph.aval(n.inputs[0])[1], graph.aval(n.inputs[1])[1]
        return 2.0 * out * a[-1] if b else 0.0
    if n.op in ("reduce_sum", "reduce_max", "reduce_min", "cumsum"):
        return float(math.prod(graph.aval(n.inputs[0])[1]))
    if n.op in _TRANSCENDENTAL:
        return 10.0 * out
    return float(out)


def node_bytes(n: Node) -> int:
    return math.prod(n.shape) * np.dtype(n.dtype).itemsize


@dataclass(frozen=True)
class Cost:
    flops: float
    bytes_in: int  # inputs the caller ships
    bytes_out: int  # outputs that come back

    def seconds(self, flops_per_second: float) -> float:
        return self.flops / flops_per_second


def graph_cost(graph: Graph) -> Cost:
    flops = sum(node_flops(graph, n) for n in graph.nodes)
    bytes_in = sum(math.prod(i.shape) * np.dtype(i.dtype).itemsize for i in graph.inputs)
    bytes_out = sum(math.prod(graph.aval(v)[1]) * np.dtype(graph.aval(v)[0]).itemsize for _, v in graph.outputs)
    return Cost(flops, bytes_in, bytes_out)
