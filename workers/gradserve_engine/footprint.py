"""What graphs, plans and analyses hold in memory, estimated: the engine's caches of plans,
derived graphs and the scheduler's analyses are bounded by these bytes, and a residual session
is charged them for its graph and its values' array objects.

A graph or plan is mostly small Python objects (a node, its operand and shape tuples, its
attribute dict; a plan step, its kernel and free lists), so the estimate is a count of them
times their cost, measured once with tracemalloc on CPython 3.11 (tests/test_hardening_memory.py
checks that it stays within a factor of 2 of what tracemalloc sees, over graphs of many shapes),
plus the bytes of every constant array, which are counted exactly. A plan's estimate includes its
graph (each plan owns the optimised graph it runs). Fused plans' compiled kernels are cached by
the backend, shared between plans, and not counted here; nor is the device memory a GPU plan's
CUDA graphs hold once recorded, which the engine adds to the plan's charge when they record.
"""

from __future__ import annotations

from .ir import Graph, is_graphs
from .partition import Partition
from .plan import Plan
from .shard import Sharding

NODE_BYTES = 300  # a Node: the object, its operands, shape and attribute dict
ATTR_BYTES = 120  # each attribute of a node (its entry, and a tuple of ints)
INPUT_BYTES = 220  # an Input: the object, its shape; its name counts by length
OUTPUT_BYTES = 120  # an output: its (name, id) pair; its name counts by length
CONSTANT_BYTES = 450  # a constant's array object, besides its data
STEP_BYTES = 480  # a plan step: the object, its kernel call, operands and frees
STEP_ATTR_BYTES = 240  # each attribute a step's kernel is called with
SLOT_BYTES = 80  # each input and output of a plan: its (name, slot) entries
SHARD_STATE_BYTES = 64  # a value's state in a sharding analysis
ARRAY_BYTES = 120  # an array object besides its data, and its entry in a map of values


def graph_bytes(graph: Graph) -> int:
    """The estimated memory of `graph` (its constants' data counted exactly), its subgraphs included."""
    attrs = sum(len(n.attrs) for n in graph.nodes)
    names = sum(len(i.name) for i in graph.inputs) + sum(len(name) for name, _ in graph.outputs)
    subgraphs = sum(graph_bytes(g) for n in graph.nodes for v in n.attrs.values() if is_graphs(v) for g in v)
    return (NODE_BYTES * len(graph.nodes) + ATTR_BYTES * attrs + INPUT_BYTES * len(graph.inputs)
            + OUTPUT_BYTES * len(graph.outputs) + names + subgraphs
            + sum(CONSTANT_BYTES + c.nbytes for c in graph.constants))


def plan_bytes(plan: Plan) -> int:
    """The estimated memory of `plan`, its graph included."""
    attrs = sum(len(n.attrs) for n in plan.graph.nodes)
    return (graph_bytes(plan.graph) + STEP_BYTES * len(plan.steps) + STEP_ATTR_BYTES * attrs
            + SLOT_BYTES * (len(plan.inputs) + len(plan.outputs)))


def partition_bytes(p: Partition) -> int:
    """The estimated memory of a partition: the joint graph, each part's and each join's."""
    return graph_bytes(p.joint) + sum(graph_bytes(part.graph) for part in p.parts) + sum(
        graph_bytes(g) for g in p.driver if g is not None)


def sharding_bytes(s: Sharding) -> int:
    """The estimated memory of a sharding analysis: one state per value of its graph."""
    return SHARD_STATE_BYTES * len(s.states)
