"""One request cannot kill, wedge or bloat the server: the engine's side.

  3. an attribute's size is checked before it is converted;
  4. time: transforms and plan building are linear in the outputs and inputs, stop inside their
     loops, and a large matmul runs in blocks with a stop check between them;

Every limit is tested with a small configured value: nothing here allocates more than a few MiB.
"""

from __future__ import annotations

import itertools
import tracemalloc

import grpc
import numpy as np
import pytest
from service_fixtures import rpc_error

from gradserve_engine import plan as plan_module
from gradserve_engine.engine import Engine
from gradserve_engine.errors import Cancelled, LimitError
from gradserve_engine.guard import stop_when
from gradserve_engine.ir import Builder, Graph
from gradserve_engine.ops import KERNELS
from gradserve_engine.ops import emit as e
from gradserve_engine.plan import BlockedMatmul, Plan
from gradserve_engine.v1 import graph_pb2
from gradserve_engine.v1 import service_pb2 as pb

MiB = 1 << 20
RESOURCE_EXHAUSTED, INVALID_ARGUMENT = grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT


def _build(fn, *inputs: tuple[str, str, tuple[int, ...]]) -> Graph:
    """A graph of `fn(*input vars)` -> {name: var} (engine emitters)."""
    b = Builder()
    xs = [b.input(name, dtype, shape) for name, dtype, shape in inputs]
    return b.build(list(fn(*xs).items()))


# ---------------------------------------------------------------- 3. attributes


def _reshape_with_attribute(entries: int) -> graph_pb2.Graph:
    msg = graph_pb2.Graph()
    msg.inputs.add(id=0, name="x", dtype=graph_pb2.FLOAT64, shape=[4])
    node = msg.nodes.add(id=1, op="reshape", inputs=[0], dtype=graph_pb2.FLOAT64, shape=[4])
    node.attrs["shape"].ints.values.extend(itertools.repeat(1000, entries))
    msg.outputs.add(name="out", id=1)
    return msg


def test_a_huge_attribute_is_refused_before_it_is_converted():
    msg = _reshape_with_attribute(1_000_000)
    tracemalloc.start()
    try:
        with pytest.raises(LimitError) as info:
            Graph.from_proto(msg)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "1000000 entries" in str(info.value) and len(str(info.value)) < 300, str(info.value)[:500]
    assert peak < 1 * MiB, f"decoding a refused attribute allocated {peak} bytes"
    msg = _reshape_with_attribute(1)
    for k in range(100):
        msg.nodes[0].attrs[f"extra{k}"].i = k
    with pytest.raises(LimitError, match=r"101 attributes"):
        Graph.from_proto(msg)


def test_a_huge_attribute_is_refused_by_the_service(bare):
    err = rpc_error(bare.RegisterGraph, pb.RegisterGraphRequest(graph=_reshape_with_attribute(1_000_000)), timeout=30)
    assert err.code() == RESOURCE_EXHAUSTED and "1000000 entries" in err.details(), (err.code(), err.details()[:300])
    assert len(err.details()) < 300


# ---------------------------------------------------------------- 4. time


class Name(str):
    """A name that counts the comparisons made with it: a scan of a list of names compares
    with each, a dict or set lookup with one."""

    compared = 0

    def __eq__(self, other: object) -> bool:
        Name.compared += 1
        return str.__eq__(self, other)

    __hash__ = str.__hash__


def _name_work(n: int, call) -> int:
    b = Builder()
    xs = [b.input(Name(f"x{i}"), "float64", ()) for i in range(n)]
    g = b.build([(Name(f"y{i}"), e.bind("sin", x)) for i, x in enumerate(xs)])
    inputs = {Name(f"x{i}"): 0.5 for i in range(n)}
    Name.compared = 0
    call(Engine(), g, inputs, [Name(f"x{i}") for i in range(n)], [Name(f"y{i}") for i in range(n)])
    return Name.compared


CALLS = {
    "evaluate": lambda eng, g, inputs, xs, ys: eng.evaluate(g, inputs, ys),
    "vjp": lambda eng, g, inputs, xs, ys: eng.vjp(g, inputs, xs),
    "vjp of chosen outputs": lambda eng, g, inputs, xs, ys: eng.vjp(g, inputs, xs[:2], outputs=ys),
    "jvp": lambda eng, g, inputs, xs, ys: eng.jvp(g, inputs, {x: 1.0 for x in xs}),
    "open_vjp": lambda eng, g, inputs, xs, ys: eng.open_vjp(g, inputs, xs),
    "jacobian": lambda eng, g, inputs, xs, ys: eng.jacobian(g, inputs, xs[:2], ys),
}


@pytest.mark.parametrize("call", sorted(CALLS))
def test_calls_are_linear_in_the_numbers_of_inputs_and_outputs(call):
    """Name comparisons at 4x the inputs and outputs: about 4x, not 16x (a scan per name)."""
    small, large = _name_work(500, CALLS[call]), _name_work(2000, CALLS[call])
    assert large <= 5 * max(small, 1), (call, small, large)


def test_a_stop_is_checked_while_transforms_and_plans_are_built():
    g = _build(lambda x: {"out": e.bind("reduce_sum", _chain(x, 3000), axes=(0,), keepdims=False)},
               ("x", "float64", (3,)))
    for request in ("vjp", "hessian", "jvp", "evaluate"):
        engine = Engine()
        polls = itertools.count()

        def stop(polls=polls) -> bool:
            return next(polls) > 0  # the first check passes: stopped from inside a loop

        with stop_when(stop), pytest.raises(Cancelled, match=r"stopped (while|inside)") as info:
            if request == "vjp":
                engine.vjp(g, {"x": np.ones(3)}, ["x"])
            elif request == "hessian":
                engine.hessian(g, {"x": np.ones(3)}, ["x"], "out")
            elif request == "jvp":
                engine.jvp(g, {"x": np.ones(3)}, {"x": np.ones(3)})
            else:
                engine.evaluate(g, {"x": np.ones(3)})
        assert "before" not in str(info.value), (request, str(info.value))  # not between kernels: while building
        assert engine.cache_info().size == 0 and not engine._graphs, request  # nothing half-built was kept


def _chain(x, n: int):
    for k in range(n):
        x = e.bind("sin" if k % 2 else "cos", x)
    return x


def test_large_matmuls_run_in_blocks_with_the_numpy_result(monkeypatch):
    monkeypatch.setattr(plan_module, "MATMUL_SPLIT_FLOPS", 1 << 12)
    monkeypatch.setattr(plan_module, "MATMUL_BLOCK_FLOPS", 1 << 12)
    monkeypatch.setattr(plan_module, "MIN_TILE", 4)
    rng = np.random.default_rng(0)
    cases = [((70, 30), (30, 50)), ((5, 40, 30), (30, 50)), ((3, 1, 40, 30), (1, 4, 30, 50)), ((40, 30), (6, 30, 20)),
             ((1, 300), (300, 200)), ((2, 3, 16, 16), (2, 3, 16, 16))]
    for dtype in ("float64", "float32", "int64", "int32"):
        for sa, sb in cases:
            a = (rng.standard_normal(sa) * 10).astype(dtype)
            b = (rng.standard_normal(sb) * 10).astype(dtype)
            g = _build(lambda p, q: {"out": e.bind("matmul", p, q)}, ("a", dtype, sa), ("b", dtype, sb))
            plan = Plan(g)
            assert isinstance(plan.steps[0].fn, BlockedMatmul), (sa, sb)
            got, want = plan.run({"a": a, "b": b})["out"], np.matmul(a, b)
            assert got.dtype == want.dtype and got.shape == want.shape
            if dtype.startswith("int") or len(sa) > 2:  # integers, and whole batch entries: the same bits
                np.testing.assert_array_equal(got, want, err_msg=str((dtype, sa, sb)))
            else:  # BLAS may round a block's edge rows differently: within an ulp or so
                np.testing.assert_allclose(got, want, rtol=1e-5 if dtype == "float32" else 1e-12,
                                           atol=1e-4 if dtype == "float32" else 1e-10, err_msg=str((dtype, sa, sb)))
    # the default threshold leaves small matmuls alone
    monkeypatch.undo()
    small = _build(lambda p, q: {"out": e.bind("matmul", p, q)}, ("a", "float64", (64, 64)), ("b", "float64", (64, 64)))
    assert Plan(small).steps[0].fn is KERNELS["matmul"]
    big = _build(lambda p, q: {"out": e.bind("matmul", p, q)}, ("a", "float64", (1024, 1024)), ("b", "float64", (1024, 1024)))
    assert isinstance(Plan(big).steps[0].fn, BlockedMatmul)


def test_a_stop_ends_a_large_matmul_between_blocks(monkeypatch):
    monkeypatch.setattr(plan_module, "MATMUL_SPLIT_FLOPS", 1 << 12)
    monkeypatch.setattr(plan_module, "MATMUL_BLOCK_FLOPS", 1 << 12)
    monkeypatch.setattr(plan_module, "MIN_TILE", 4)
    blocks = [0]

    def counted(a, b, out=None):
        blocks[0] += 1
        return np.matmul(a, b, out=out)

    g = _build(lambda p, q: {"out": e.bind("matmul", p, q)}, ("a", "float64", (64, 64)), ("b", "float64", (64, 64)))
    plan = Plan(g, kernels={**KERNELS, "matmul": counted})
    checks = [0]

    def stop() -> bool:
        checks[0] += 1
        return checks[0] > 2  # before the step, before the first block: then stop

    with stop_when(stop), pytest.raises(Cancelled, match="inside a matmul"):
        plan.run({"a": np.ones((64, 64)), "b": np.ones((64, 64))})
    assert blocks[0] == 1
    assert np.array_equal(plan.run({"a": np.ones((64, 64)), "b": np.ones((64, 64))})["out"], np.full((64, 64), 64.0))
    assert blocks[0] > 2
