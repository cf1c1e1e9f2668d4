"""One request cannot kill, wedge or bloat the server: the engine's side.

  1. a response the graph says is over the message limit is refused before anything is computed;
  2. memory per call is known from the plan (its peak, from liveness) and bounded: per call
     (--max-call-mib), for the calls in flight together (--max-inflight-mib), the element limit on
     tensors a call derives (Jacobian seeds, batched results), and MemoryError is RESOURCE_EXHAUSTED;
  3. an attribute's size is checked before it is converted;
  4. time: transforms and plan building are linear in the outputs and inputs, stop inside their
     loops, and a large matmul runs in blocks with a stop check between them;
  5. one cast rule for values given for typed slots, in the engine and in the SDK.

Every limit is tested with a small configured value: nothing here allocates more than a few MiB.
"""

from __future__ import annotations

import itertools
import threading
import tracemalloc

import grpc
import numpy as np
import pytest
from service_fixtures import HOST, ServerProcess, channel, fill, rpc_error, stub

import gradserve as gs
from gradserve import remote as rm
from gradserve_engine import engine as engine_module
from gradserve_engine import plan as plan_module
from gradserve_engine.engine import Engine, conform
from gradserve_engine.errors import Cancelled, LimitError, ShapeError
from gradserve_engine.guard import Budget, stop_when, within
from gradserve_engine.ir import Builder, Graph
from gradserve_engine.ops import KERNELS
from gradserve_engine.ops import emit as e
from gradserve_engine.plan import BlockedMatmul, Plan
from gradserve_engine.v1 import graph_pb2
from gradserve_engine.v1 import service_pb2 as pb

MiB = 1 << 20
RESOURCE_EXHAUSTED, INVALID_ARGUMENT = grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture
def plan_runs(monkeypatch):
    """How many times a plan ran (in this process: the in-process servers' plans too)."""
    runs = [0]
    original = Plan.run_values

    def counted(self, values):
        runs[0] += 1
        return original(self, values)

    monkeypatch.setattr(Plan, "run_values", counted)
    return runs


def _build(fn, *inputs: tuple[str, str, tuple[int, ...]]) -> Graph:
    """A graph of `fn(*input vars)` -> {name: var} (engine emitters)."""
    b = Builder()
    xs = [b.input(name, dtype, shape) for name, dtype, shape in inputs]
    return b.build(list(fn(*xs).items()))


# ---------------------------------------------------------------- 1. responses over the message limit


def test_a_response_over_the_message_limit_is_refused_before_anything_is_computed(serve_in_process, plan_runs):
    server = serve_in_process(max_message_bytes=1 * MiB)
    broadcast = _build(lambda x: {"out": e.broadcast_to(x, (1 << 18,))}, ("x", "float64", ()))  # 2 MiB from 8 bytes
    square = _build(lambda x: {"s": e.bind("reduce_sum", e.mul(x, x), axes=(0,), keepdims=False), "v": e.bind("sin", x)},
                    ("x", "float64", (400,)))
    wide = _build(lambda x: {"s": e.bind("reduce_sum", e.broadcast_to(x, (1 << 16,)), axes=(0,), keepdims=False),
                             "v": e.broadcast_to(x, (1 << 16,))}, ("x", "float64", ()))  # 512 KiB per item
    with channel(f"{HOST}:{server.port}") as ch:
        st = stub(ch)
        for g in (broadcast, square, wide):
            st.RegisterGraph(pb.RegisterGraphRequest(graph=g.to_proto()), timeout=10)
        x400 = {"x": np.linspace(0.0, 1.0, 400)}
        requests = []
        req = pb.EvaluateRequest(graph_id=broadcast.id)
        fill(req.inputs, {"x": 1.0})
        requests.append(("Evaluate", st.Evaluate, req, ["output 'out' is f64[262144], 2.0 MiB", "1.0 MiB"]))
        req = pb.GradientRequest(graph_id=broadcast.id, wrt=["x"])
        fill(req.inputs, {"x": 1.0})
        requests.append(("Gradient", st.Gradient, req, ["output 'out'", "f64[262144]"]))
        req = pb.JvpRequest(graph_id=broadcast.id)
        fill(req.inputs, {"x": 1.0})
        fill(req.tangents, {"x": 1.0})
        requests.append(("Jvp", st.Jvp, req, ["f64[262144]", "4.0 MiB"]))
        req = pb.JacobianRequest(graph_id=square.id, wrt=["x"], outputs=["v"])
        fill(req.inputs, x400)
        requests.append(("Jacobian", st.Jacobian, req, ["the Jacobian of output 'v' by input 'x' is f64[400,400]"]))
        req = pb.HessianRequest(graph_id=square.id, wrt=["x"], output="s")
        fill(req.inputs, x400)
        requests.append(("Hessian", st.Hessian, req, ["the Hessian block of inputs 'x' and 'x' is f64[400,400]"]))
        req = pb.BatchGradientRequest(graph_id=wide.id, wrt=["x"], outputs=["s"])
        for _ in range(3):
            fill(req.items.add().inputs, {"x": 1.0})
        requests.append(("BatchGradient", st.BatchGradient, req, ["output 'v' is f64[65536]", "for each of 3 input sets"]))
        for method, call, request, words in requests:
            before = plan_runs[0]
            err = rpc_error(call, request, timeout=20)
            assert err.code() == RESOURCE_EXHAUSTED, (method, err.code(), err.details())
            for word in [*words, "--max-message-mib", "nothing was computed"]:
                assert word in err.details(), (method, word, err.details())
            assert plan_runs[0] == before, f"{method} computed before it was refused"
        # what fits is still served
        req = pb.EvaluateRequest(graph_id=square.id, outputs=["s"])
        fill(req.inputs, x400)
        assert st.Evaluate(req, timeout=10).outputs["s"].data


def test_a_batched_call_vjp_over_the_message_limit_is_refused_before_it_runs(serve_in_process, plan_runs):
    server = serve_in_process(max_message_bytes=1 * MiB)
    with gs.connect(f"{HOST}:{server.port}", timeout=20) as r:
        w = np.linspace(0.0, 1.0, 1000)
        _, vjp_fn = r.vjp(lambda x: gs.sum(x * w), w)
        assert np.allclose(vjp_fn(1.0)[0], w)
        before = plan_runs[0]
        with pytest.raises(rm.RemoteResourceExhausted) as info:
            vjp_fn(np.ones(300), batched=True)  # gradients f64[300,1000]: 2.3 MiB
        assert "gradient for 'x' is f64[300,1000]" in str(info.value), str(info.value)
        assert plan_runs[0] == before
        vjp_fn.close()


# ---------------------------------------------------------------- 2. memory per call


def _four_live(n: int) -> Graph:
    """Four live f64[n] intermediates from a scalar: peak 4n*8 bytes (+ the sum's)."""
    def fn(x):
        a = e.broadcast_to(x, (n,))
        parts = [e.bind(op, a) for op in ("sin", "cos", "exp", "tanh")]
        total = e.add(e.add(parts[0], parts[1]), e.add(parts[2], parts[3]))
        return {"out": e.bind("reduce_sum", total, axes=(0,), keepdims=False)}

    return _build(fn, ("x", "float64", ()))


def test_peak_bytes_count_live_buffers_views_reuse_and_inputs():
    n = 1000
    # four live intermediates; the adds write over the dead ones (no new buffers)
    assert Plan(_four_live(n)).peak_bytes == 8 + 4 * 8 * n
    chain = _build(lambda x: {"out": e.bind("exp", e.bind("cos", e.bind("sin", x)))}, ("x", "float64", (n,)))
    assert Plan(chain).peak_bytes == 2 * 8 * n  # the input, and one buffer written over twice
    # a view holds its operand; an output that is a view of an input is copied at the end
    view = _build(lambda x: {"out": e.broadcast_to(x, (n,))}, ("x", "float64", ()))
    assert Plan(view).peak_bytes == 8 + 8 * n
    # a reshape of a transposed value is a copy (numpy copies it); a reshape of the input is not
    copied = _build(lambda x: {"out": e.bind("sin", e.reshape(e.bind("transpose", x, perm=(1, 0)), (200,)))},
                    ("x", "float32", (10, 20)))
    assert Plan(copied).peak_bytes == 3 * 4 * 200
    viewed = _build(lambda x: {"out": e.bind("sin", e.reshape(x, (200,)))}, ("x", "float32", (10, 20)))
    assert Plan(viewed).peak_bytes == 2 * 4 * 200
    # values later steps still read keep their buffers: x, a, b and a+b live at once
    def kept(x):
        a, b = e.bind("sin", x), e.bind("cos", x)
        return {"out": e.mul(e.mul(e.add(a, b), a), b)}

    assert Plan(_build(kept, ("x", "float64", (n,)))).peak_bytes == 4 * 8 * n


def test_a_call_over_max_call_mib_is_refused_before_it_runs():
    """--max-call-mib 1 and a 60-byte request whose computation needs 4 MiB."""
    g = _four_live(1 << 17)  # four live f64[131072]: 4 MiB
    with ServerProcess("--max-call-mib", "1") as s, channel(s.address) as ch:
        st = stub(ch)
        st.RegisterGraph(pb.RegisterGraphRequest(graph=g.to_proto()), timeout=10)
        req = pb.EvaluateRequest(graph_id=g.id)
        fill(req.inputs, {"x": 0.5})
        assert len(req.SerializeToString()) < 100
        err = rpc_error(st.Evaluate, req, timeout=20)
        assert err.code() == RESOURCE_EXHAUSTED, (err.code(), err.details())
        assert "4.0 MiB" in err.details() and "1.0 MiB per call (--max-call-mib)" in err.details(), err.details()
        req = pb.GradientRequest(graph_id=g.id, wrt=["x"])
        fill(req.inputs, {"x": 0.5})
        assert rpc_error(st.Gradient, req, timeout=20).code() == RESOURCE_EXHAUSTED
        small = _four_live(1000)  # the server still serves what fits
        st.RegisterGraph(pb.RegisterGraphRequest(graph=small.to_proto()), timeout=10)
        req = pb.EvaluateRequest(graph_id=small.id)
        fill(req.inputs, {"x": 0.5})
        assert st.Evaluate(req, timeout=10).outputs["out"].data


def test_plans_in_flight_share_the_server_budget():
    """A plan that would take the calls in flight over --max-inflight-mib is refused (retry
    later) while another holds its share; it runs once that one has finished."""
    entered, release = threading.Event(), threading.Event()

    def blocking_sin(x, out=None):
        entered.set()
        assert release.wait(20)
        return np.sin(x, out=out)

    g = _four_live(1 << 16)  # 2 MiB at its peak
    slow = Plan(g, kernels={**KERNELS, "sin": blocking_sin})
    fast = Plan(g)
    budget = Budget(max_call_bytes=4 * MiB, max_inflight_bytes=3 * MiB)
    results: list = []

    def first():
        with within(budget):
            results.append(slow.run({"x": 0.5}))

    t = threading.Thread(target=first)
    t.start()
    try:
        assert entered.wait(20)
        assert budget.inflight == slow.peak_bytes
        with within(budget), pytest.raises(LimitError, match=r"the calls in flight hold 2\.0 MiB.*retry later"):
            fast.run({"x": 0.5})
    finally:
        release.set()
        t.join(20)
    assert budget.inflight == 0 and len(results) == 1
    with within(budget):
        assert fast.run({"x": 0.5})["out"] == results[0]["out"]
    assert budget.inflight == 0


def test_derived_tensors_obey_the_element_limit(serve_in_process, plan_runs):
    """Jacobian and Hessian seeds (the identity) and batched CallVjp results are tensors no
    request declared: the element limit applies to them too."""
    server = serve_in_process(max_elements=1000)
    x = np.linspace(0.1, 1.0, 40)
    with gs.connect(f"{HOST}:{server.port}", timeout=20) as r:
        before = plan_runs[0]
        with pytest.raises(rm.RemoteResourceExhausted, match=r"seeds.*f64\[40,40\].*more than the limit of 1000"):
            r.jacobian(lambda x: gs.sin(x))(x)  # seeds f64[40,40]
        with pytest.raises(rm.RemoteResourceExhausted, match=r"seeds.*more than the limit of 1000"):
            r.hessian(lambda x: gs.sum(gs.sin(x)))(x)
        assert plan_runs[0] == before
        assert np.allclose(r.jacobian(lambda x: gs.sin(x))(x[:30]), np.diag(np.cos(x[:30])))  # 900 elements
        w = np.linspace(0.0, 1.0, 100)
        _, vjp_fn = r.vjp(lambda v: gs.sum(v * w), w)
        with pytest.raises(rm.RemoteResourceExhausted, match=r"f64\[20,100\].*more than the limit of 1000"):
            vjp_fn(np.ones(20), batched=True)  # results f64[20,100]
        assert np.allclose(vjp_fn(np.ones(5), batched=True)[0], np.tile(w, (5, 1)))
        vjp_fn.close()


def test_memory_error_anywhere_in_a_call_is_resource_exhausted(serve_in_process):
    def no_memory(x, out=None):
        raise MemoryError("cannot allocate")

    g = _build(lambda x: {"out": e.bind("sin", x)}, ("x", "float64", (3,)))
    with pytest.raises(LimitError, match=r"out of memory while running .*sin"):
        Plan(g, kernels={**KERNELS, "sin": no_memory}).run({"x": np.ones(3)})

    class Starved(Engine):
        def evaluate(self, graph, inputs, outputs=None):
            raise MemoryError("cannot allocate")  # outside any plan: decoding, seeds, encoding

    server = serve_in_process(Starved())
    with channel(f"{HOST}:{server.port}") as ch:
        st = stub(ch)
        st.RegisterGraph(pb.RegisterGraphRequest(graph=g.to_proto()), timeout=10)
        req = pb.EvaluateRequest(graph_id=g.id)
        fill(req.inputs, {"x": np.ones(3)})
        err = rpc_error(st.Evaluate, req, timeout=10)
        assert err.code() == RESOURCE_EXHAUSTED and "out of memory" in err.details(), (err.code(), err.details())


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
    mlp = _build(lambda p, q: {"out": e.bind("matmul", p, q)}, ("a", "float64", (1024, 1024)), ("b", "float64", (1024, 1024)))
    assert Plan(mlp).steps[0].fn is KERNELS["matmul"]  # an MLP's matmuls stay one BLAS call
    big = _build(lambda p, q: {"out": e.bind("matmul", p, q)}, ("a", "float64", (4096, 2048)), ("b", "float64", (2048, 2048)))
    assert isinstance(Plan(big).steps[0].fn, BlockedMatmul)  # about a second of work: planned, never run here


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


# ---------------------------------------------------------------- 5. casts


NEG = _build(lambda x: {"out": e.bind("neg", x)}, ("x", "float32", (2,)))
NEG_I32 = _build(lambda x: {"out": e.bind("neg", x)}, ("x", "int32", (2,)))
NEG_F64 = _build(lambda x: {"out": e.bind("neg", x)}, ("x", "float64", (2,)))


@pytest.mark.parametrize(("graph", "value", "words"), [
    (NEG, np.array([3e300, 1.0]), ["input 'x'", "float64", "float32", "3e+300 becomes inf"]),
    (NEG, np.array([0.1, 0.5]), ["input 'x'", "float64", "float32", "0.1 becomes"]),
    (NEG_I32, np.array([2**40, 1]), ["input 'x'", "int64", "int32", "1099511627776 becomes 0"]),
    (NEG_I32, np.array([1.5, 1.0]), ["input 'x'", "float64", "int32"]),
    (NEG_F64, np.array([2**53 + 1, 0]), ["input 'x'", "int64", "float64"]),
    (NEG_I32, np.array([2**31, 0], np.uint32), ["input 'x'", "uint32", "int32"]),
])
def test_a_lossy_cast_is_refused(graph, value, words):
    with pytest.raises(ShapeError) as info:
        Engine().evaluate(graph, {"x": value})
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_an_exact_cast_or_a_fitting_python_scalar_converts():
    eng = Engine()
    for graph, value, want in [
        (NEG, np.array([0.5, np.nan]), np.array([-0.5, np.nan], np.float32)),  # exact, NaN-aware
        (NEG, np.array([3, -4]), np.array([-3, 4], np.float32)),  # small integers are exact floats
        (NEG_F64, np.array([4, 2**53]), np.array([-4.0, -(2.0**53)])),  # int64 for float64, when exact
        (NEG_I32, np.array([2.0, -7.0]), np.array([-2, 7], np.int32)),
        (NEG, 0.1, -np.full(2, 0.1, np.float32)),  # a Python float is weak: it rounds
        (NEG_I32, 7, np.full(2, -7, np.int32)),
        (NEG_I32, 3.0, np.full(2, -3, np.int32)),
    ]:
        if np.ndim(value) == 0:
            graph = _build(lambda x: {"out": e.bind("neg", x)}, ("x", graph.inputs[0].dtype, ()))
            want = want[0]
        got = eng.evaluate(graph, {"x": value})["out"]
        assert got.dtype == want.dtype and np.array_equal(got, want, equal_nan=True), (value, got, want)


@pytest.mark.parametrize(("value", "dtype"), [(3e300, "float32"), (2**40, "int32"), (2.5, "int64"),
                                              (10**400, "float64"), (float("nan"), "int32")])
def test_a_python_scalar_that_does_not_fit_is_refused(value, dtype):
    with pytest.raises(ShapeError, match=f"does not fit in {dtype}"):
        conform(value, dtype, "input 'x'")


@pytest.mark.parametrize(("value", "dtype"), [(True, "float32"), (1, "bool"), (np.array([True]), "float64"),
                                              (np.array([0, 1]), "bool")])
def test_booleans_and_numbers_do_not_mix(value, dtype):
    with pytest.raises(ShapeError, match=f"expected (a value of dtype )?{dtype}"):
        conform(value, dtype, "input 'x'")


def test_the_sdk_applies_the_engines_cast_rule_before_sending(remote, bare):
    assert rm.conform is engine_module.conform  # one function, not a copy
    g = gs.trace(lambda x: -x, np.zeros(2, np.float32))
    gid = remote.register(g)
    # a Python scalar is weak: it travels as the input's float32 (on the wire: 0.1 as float64 would be refused)
    scalar = gs.trace(lambda x: -x, np.float32(0.0))
    out = remote.evaluate(scalar, {"x": 0.1})
    assert out["out"].dtype == np.float32 and out["out"] == -np.float32(0.1)
    with pytest.raises(rm.RemoteInvalidArgument, match=r"input 'x' has dtype float64, expected float32.*3e\+300 becomes inf"):
        remote.evaluate(g, {"x": np.array([3e300, 1.0])})
    assert np.array_equal(remote.evaluate(gid, {"x": np.array([0.5, 2.0])})["out"], np.array([-0.5, -2.0], np.float32))
    # the server applies the same rule to what the wire brings
    req = pb.EvaluateRequest(graph_id=gid)
    fill(req.inputs, {"x": np.array([3e300, 1.0])})
    err = rpc_error(bare.Evaluate, req, timeout=10)
    assert err.code() == INVALID_ARGUMENT and "'x'" in err.details() and "float64" in err.details() \
        and "float32" in err.details(), err.details()
    gi = remote.register(gs.trace(lambda n: n + 1, np.zeros(2, np.int32)))
    req = pb.EvaluateRequest(graph_id=gi)
    fill(req.inputs, {"n": np.array([2**40, 1])})
    err = rpc_error(bare.Evaluate, req, timeout=10)
    assert err.code() == INVALID_ARGUMENT and "1099511627776 becomes 0" in err.details(), err.details()
    gf = remote.register(gs.trace(lambda x: x * 2.0, np.zeros(2)))
    req = pb.EvaluateRequest(graph_id=gf)
    fill(req.inputs, {"x": np.array([4, 5])})  # int64 for float64: exact, accepted
    assert np.frombuffer(bare.Evaluate(req, timeout=10).outputs["out"].data, "<f8").tolist() == [8.0, 10.0]
    # cotangents of a float32 output: a Python float converts, a lossy numpy float64 does not
    _, vjp_fn = remote.vjp(lambda x: gs.sum(x * 2.0), np.ones(2, np.float32))
    (grad,) = vjp_fn(0.1)
    assert grad.dtype == np.float32 and np.allclose(grad, 0.2)
    with pytest.raises(rm.RemoteInvalidArgument, match="cotangent for output 'out' has dtype float64, expected float32"):
        vjp_fn(np.float64(0.1))
    vjp_fn.close()
    # and the local session: the same rule, in the engine
    _, local_vjp = gs.vjp(lambda x: gs.sum(x * 2.0), np.ones(2, np.float32))
    assert np.allclose(local_vjp(0.1)[0], 0.2)
    with pytest.raises(ShapeError, match="expected float32"):
        local_vjp(np.float64(0.1))
