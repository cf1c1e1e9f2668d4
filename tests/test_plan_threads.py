"""Large elementwise numpy steps in slices on the process's thread pool: every such primitive
gives the bits of the whole call (broadcast operands, results written over dead operands), and
each step settles on the faster way by measuring."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradserve_engine import buffers, threads
from gradserve_engine.ir import Builder
from gradserve_engine.ops import OUT_CAPABLE, PRIMITIVES
from gradserve_engine.plan import ChunkedStep, Plan

SLICEABLE = sorted(op for op, p in PRIMITIVES.items() if p.elementwise and op in OUT_CAPABLE)
SHAPE = (37, 5, 8)  # the first axis does not divide evenly into slices


def _operands(op: str, dtype: str, rng: np.random.Generator) -> list[np.ndarray]:
    """Operands in the op's domain: full, row-broadcast and scalar-like shapes."""
    shapes = [SHAPE, (1, *SHAPE[1:]), SHAPE[1:]][:PRIMITIVES[op].arity]
    lo = 0.1 if op in ("log", "sqrt", "pow", "log1p") else -0.9
    return [rng.uniform(lo, 0.9, s).astype(dtype) for s in shapes]


@pytest.mark.parametrize("op", SLICEABLE)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_sliced_steps_give_the_bits_of_whole_ones(op, dtype):
    ins = _operands(op, dtype, np.random.default_rng(len(op)))
    b = Builder()
    xs = [b.input(f"x{k}", dtype, a.shape) for k, a in enumerate(ins)]
    y = b.bind(op, *xs)
    graph = b.build([("y", b.bind("add", y, y))])  # y dies at the add: its result may go over it
    feed = {f"x{k}": a for k, a in enumerate(ins)}
    whole = Plan(graph, parallel_min_work=math.inf).run(feed)["y"]
    plan = Plan(graph, parallel_min_work=0)
    steps = [s for s in plan.steps if isinstance(s, ChunkedStep)]
    assert len(steps) == (2 if threads.available_cores() > 1 else 0)
    for s in steps:
        s.sliced = True
    for _ in range(2):  # the second call writes into buffers the first left
        np.testing.assert_array_equal(plan.run(feed)["y"], whole)


@pytest.mark.skipif(threads.available_cores() < 2, reason="one core: no step is sliceable")
def test_each_step_measures_then_keeps_one_way():
    b = Builder()
    x = b.input("x", "float64", (64, 256))
    graph = b.build([("y", b.bind("tanh", x))])
    plan = Plan(graph, parallel_min_work=0)
    (step,) = plan.steps
    assert isinstance(step, ChunkedStep) and step.sliced is None and "measuring" in str(plan)
    feed = {"x": np.random.default_rng(0).standard_normal((64, 256))}
    want = np.tanh(feed["x"])
    for _ in range(2 * ChunkedStep.TRIALS):
        np.testing.assert_array_equal(plan.run(feed)["y"], want)
    assert step.sliced is not None and len(step.times[0]) == len(step.times[1]) == ChunkedStep.TRIALS
    assert step.sliced == (min(step.times[1]) < ChunkedStep.MARGIN * min(step.times[0]))
    info = plan.kernel_info()
    assert info["sliceable_steps"] == 1 and info["sliced_steps"] == int(step.sliced)
    np.testing.assert_array_equal(plan.run(feed)["y"], want)


@pytest.mark.skipif(threads.available_cores() < 2, reason="one core: no step is sliceable")
def test_cache_info_reports_the_threads_the_threshold_and_what_kept_plans_decided():
    from gradserve_engine.engine import Engine
    from gradserve_engine.plan import PARALLEL_MIN_WORK

    engine = Engine()
    b = Builder()
    x = b.input("x", "float64", (512, 1024))  # tanh over 2**19 elements: above the threshold
    graph = b.build([("y", b.bind("tanh", x))])
    feed = {"x": np.random.default_rng(0).standard_normal((512, 1024))}
    engine.evaluate(graph, feed)
    info = engine.cache_info()
    assert (info.threads, info.parallel_min_work) == (threads.available_cores(), PARALLEL_MIN_WORK)
    assert info.sliced_steps == info.whole_steps == 0  # still measuring
    for _ in range(2 * ChunkedStep.TRIALS):
        engine.evaluate(graph, feed)
    info = engine.cache_info()
    assert info.sliced_steps + info.whole_steps == 1


def test_small_steps_and_unsliceable_ones_stay_whole():
    b = Builder()
    x = b.input("x", "float32", (4, 8))
    big = b.input("big", "float32", (1, 1 << 20))  # a first axis of 1: nothing to slice along
    graph = b.build([("y", b.bind("exp", x)), ("z", b.bind("exp", big))])
    assert not any(isinstance(s, ChunkedStep) for s in Plan(graph).steps)


def test_the_pool_runs_every_chunk_once_and_reports_errors():
    seen = []
    threads.pool().run(lambda lo, hi: seen.extend(range(lo, hi)), threads.cuts(1000, 16))
    assert sorted(seen) == list(range(1000))

    def boom(lo, hi):
        raise ValueError(f"chunk {lo}")

    with pytest.raises(ValueError, match="chunk"):
        threads.pool().run(boom, threads.cuts(10, 5))


# ---------------------------------------------------------------- recycled buffers


def _mlp_graph(dtype: str):
    """A float64 MLP gradient's shapes: results of 2 MiB and more."""
    import gradserve as gs

    def loss(w1, w2, x):
        return gs.sum(gs.tanh(gs.tanh(x @ w1) @ w2))

    rng = np.random.default_rng(0)
    args = (rng.standard_normal((256, 1024)).astype(dtype) * 0.03, rng.standard_normal((1024, 256)).astype(dtype) * 0.03,
            rng.standard_normal((256, 256)).astype(dtype))
    return gs.grad(loss, argnums=(0, 1)), args


def test_steady_state_calls_allocate_no_new_large_buffers():
    grad, args = _mlp_graph("float64")
    for _ in range(2 * ChunkedStep.TRIALS + 1):  # sliceable steps have settled
        grad(*args)
    before = (buffers.RECYCLER.allocated, buffers.RECYCLER.reused)
    for _ in range(5):
        grad(*args)
    assert buffers.RECYCLER.allocated == before[0]  # every large buffer came back and was reused
    assert buffers.RECYCLER.reused > before[1]


def test_a_buffer_is_reused_only_after_every_view_of_it_is_gone():
    b = Builder()
    x = b.input("x", "float64", (256, 256))
    graph = b.build([("y", b.bind("exp", x))])
    plan = Plan(graph, parallel_min_work=math.inf)
    first = plan.run({"x": np.zeros((256, 256))})["y"]
    corner, column = first[:2, :2], first.T[0]  # views the caller keeps
    del first
    for k in range(3):  # the same size again and again: the buffer under the views must not be handed out
        again = plan.run({"x": np.full((256, 256), float(k + 1))})["y"]
        assert again[0, 0] == np.exp(k + 1)
    np.testing.assert_array_equal(corner, np.ones((2, 2)))
    np.testing.assert_array_equal(column, np.ones(256))
