"""Fusion in the planner, and the native (numba) kernels behind the kernel table (the GPU's are
in tests/test_gpu.py).

Fusion is a planner decision: with the numpy kernels a fused plan gives the same bits as the
unfused one. The native kernels agree with the numpy ones to 1e-12 (float64) and 1e-5
(float32), for every elementwise primitive of the spec table (tests/test_primitives.py) in
every dtype it allows, and gradients through native plans equal PyTorch's. Compiled kernels
are kept few (one per dtype and result shape for the whole spec table) so that the file runs
in well under a minute with numba compiling from scratch.
"""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from test_primitives import SPECS, arg_dtype, make_inputs, out_dtype

from gradserve.api import Functional
from gradserve_engine import autodiff, fusion, native
from gradserve_engine import threads as threads_
from gradserve_engine.engine import Engine
from gradserve_engine.fusion import KernelSet, find_groups, schedule
from gradserve_engine.ir import Builder, Graph
from gradserve_engine.ops import KERNELS, PRIMITIVES, VIEWS
from gradserve_engine.passes import optimize
from gradserve_engine.plan import FusedStep, KernelStep, Plan

TOL = {"float32": (1e-5, 1e-6), "float64": (1e-12, 1e-13)}  # rtol, atol relative to max(1, |want|)
FLOATS = ("float32", "float64")

needs_numba = pytest.mark.skipif(native.numba_status()[0] is None, reason="numba is not installed")


def assert_close(got, want, what: str = "") -> None:
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype, f"{what}: {got.dtype}{got.shape} vs {want.dtype}{want.shape}"
    if want.dtype.name in TOL:
        rtol, atol = TOL[want.dtype.name]
        finite = np.abs(want[np.isfinite(want)])  # nan and inf must match where they are, not widen atol
        scale = max(1.0, float(np.max(finite))) if finite.size else 1.0
        np.testing.assert_allclose(got, want, rtol=rtol, atol=atol * scale, err_msg=what)
    else:
        np.testing.assert_array_equal(got, want, err_msg=what)


@pytest.fixture(scope="module")
def native_kernels(tmp_path_factory) -> KernelSet:
    if native.numba_status()[0] is None:
        pytest.skip("numba is not installed")
    return native.NativeKernels(min_elements=0)


# ---------------------------------------------------------------- graphs


def mlp_loss(params, x, y):
    import gradserve as gs

    h = gs.tanh(x @ params["w1"] + params["b1"])
    h = gs.tanh(h @ params["w2"] + params["b2"])
    return gs.cross_entropy(h @ params["w3"] + params["b3"], y)


def mlp_data(dtype: str, batch: int = 32, d_in: int = 24, d_h: int = 40, d_out: int = 6):
    rng = np.random.default_rng(7)
    params = {"w1": rng.standard_normal((d_in, d_h)) / 5, "b1": rng.standard_normal(d_h) / 10,
              "w2": rng.standard_normal((d_h, d_h)) / 6, "b2": rng.standard_normal(d_h) / 10,
              "w3": rng.standard_normal((d_h, d_out)) / 6, "b3": rng.standard_normal(d_out) / 10}
    params = {k: v.astype(dtype) for k, v in params.items()}
    return params, rng.standard_normal((batch, d_in)).astype(dtype), rng.integers(0, d_out, batch)


def mlp_grad_graph(dtype: str, **sizes) -> tuple[Graph, dict]:
    import gradserve as gs

    params, x, y = mlp_data(dtype, **sizes)
    traced = gs.trace(mlp_loss, params, x, y)
    wrt = [f"params.{k}" for k in params]
    graph = optimize(autodiff.grad_only(traced, wrt, "out", keep_outputs=True))
    return graph, {"x": x, "y": y, **{f"params.{k}": v for k, v in params.items()}}


CE_SHAPE = (512, 1000)


def ce_loss(x, w, b, y):
    """Cross-entropy of logits x * w + b (a per-class affine map: the logits come from a fused group)."""
    import gradserve as gs

    return gs.cross_entropy(x * w + b, y)


def ce_grad_graph(dtype: str) -> tuple[Graph, dict]:
    """The loss and its gradients for x, w and b at CE_SHAPE. Classes 0-2 share w and b, and
    rows 5-7 reach their maximum at two or three of them (ties)."""
    import gradserve as gs

    n, c = CE_SHAPE
    rng = np.random.default_rng(11)
    x = (3 * rng.standard_normal((n, c))).astype(dtype)
    w, b = rng.uniform(0.5, 1.5, c).astype(dtype), (rng.standard_normal(c) / 10).astype(dtype)
    w[:3], b[:3] = w[0], b[0]
    x[5, :3] = x[6, 1:3] = x[7, ::2][:2] = 20
    feed = {"x": x, "w": w, "b": b, "y": rng.integers(0, c, n)}
    traced = gs.trace(ce_loss, *feed.values())
    return optimize(autodiff.grad_only(traced, ["x", "w", "b"], "out", keep_outputs=True)), feed


def torch_mlp_grads(params, x, y) -> dict:
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    h = torch.tanh(torch.tensor(x) @ tp["w1"] + tp["b1"])
    h = torch.tanh(h @ tp["w2"] + tp["b2"])
    loss = torch.nn.functional.cross_entropy(h @ tp["w3"] + tp["b3"], torch.tensor(y))
    return dict(zip(tp, (g.numpy() for g in torch.autograd.grad(loss, list(tp.values()))), strict=True))


def elementwise_table_graph(dtype: str, shape: tuple[int, ...]):
    """Every elementwise spec allowing `dtype` whose result has `shape`, in one graph: each
    result is an output and all of them (cast to one dtype) are summed, so that one fused group
    holds every op. Operands of the same kind, shape and domain are shared (fewer kernel
    arguments: numba's compile time grows with them). Returns the graph, the inputs, and
    (spec, output name, its operands' input names) per case."""
    b = Builder()
    feed: dict[str, np.ndarray] = {}
    shared: dict[tuple, tuple[str, object]] = {}
    outs: list = []
    cases = []
    acc_dtype = dtype if dtype != "bool" else "int32"
    acc = None
    for s in SPECS:
        if not PRIMITIVES[s.op].elementwise or dtype not in s.dtypes:
            continue
        values = list(make_inputs(s, dtype).values())
        if np.broadcast_shapes(*(v.shape for v in values)) != shape:
            continue
        names, xs = [], []
        for k, (value, a) in enumerate(zip(values, s.args, strict=True)):
            key = (a.kind, value.dtype.name, a.shape, a.domain, k)
            if key not in shared:
                name = f"in{len(shared)}"
                feed[name] = value
                shared[key] = (name, b.input(name, value.dtype.name, value.shape))
            names.append(shared[key][0])
            xs.append(shared[key][1])
        y = b.bind(s.op, *xs, **s.attrs)
        outs.append((f"c{len(cases)}", y))
        cases.append((s, f"c{len(cases)}", names))
        term = y if y.dtype == acc_dtype else b.bind("cast", y, dtype=acc_dtype)
        acc = term if acc is None else b.bind("add", acc, term)
    if not cases:
        return None, feed, cases
    return b.build([*outs, ("acc", acc)]), feed, cases


# result shapes of the spec table's elementwise cases: (2, 3) holds the unary ops and the same-shape and
# scalar broadcasts, (3, 4) the column-row ones, (2, 3, 4) the rank-extending ones, () the 0-d ones; the
# integer and bool kernels share the broadcasting code with the float ones, so they run fewer shapes
TABLE_CASES = [(dt, sh) for dt in ("float64", "float32") for sh in ((2, 3), (3, 4), (2, 3, 4), ())] + [
    (dt, sh) for dt in ("int32", "int64") for sh in ((2, 3), ())] + [("bool", (2, 3))]
TABLE_IDS = [f"{dt}-{'x'.join(map(str, sh)) or 'scalar'}" for dt, sh in TABLE_CASES]


# ---------------------------------------------------------------- the planner


def test_groups_of_the_mlp_gradient_and_printing() -> None:
    graph, _ = mlp_grad_graph("float64")
    groups = find_groups(graph)
    ops = {g.ops for g in groups}
    assert ("add", "tanh") in ops, "bias-add + activation"
    assert ("mul", "sub", "mul_no_nan") in ops, "tanh's VJP g * (1 - y*y)"
    assert any("exp" in o and "sub" in o for o in ops), "softmax's sub/exp chain"
    plan = Plan(graph, fusion=True)
    text = str(plan)
    for g in plan.groups:
        assert f"{','.join(f'%{n.id}' for n in g.members)} = fused[{','.join(g.ops)}]" in text
        for n in g.members:
            assert "    | " + n.text() in text  # each member under its group
    assert plan.kernel_info()["fused_groups"] == len(plan.groups) > 0


def test_groups_are_disjoint_convex_and_scheduled_in_order() -> None:
    """Groups share only recomputed members (the backward's one-hot of the labels, recomputed
    where the logits' gradient is made), which are never their outputs."""
    graph, _ = mlp_grad_graph("float32")
    groups = find_groups(graph)
    seen: set[int] = set()
    first = graph.first_node_id
    for g in groups:
        ids = {n.id for n in g.members}
        own = ids - set(g.recomputed)
        assert not own & seen
        seen |= own
        assert not {g.members[j].id for j in g.outputs} & set(g.recomputed)
        assert all(n.shape == g.shape for n in g.members)
        # convex: no member's operand outside the group depends on a member the group owns (the
        # operands may depend on a recomputed one: what they read is its owner's copy)
        external = {i for n in g.members for i in n.inputs if i not in ids}
        stack, visited = list(external), set()
        while stack:
            v = stack.pop()
            assert v not in own, f"group {g.text()} is not convex"
            if v >= first and v not in visited:
                visited.add(v)
                stack.extend(graph.nodes[v - first].inputs)
    defined = set(range(first))
    for step in schedule(graph, groups):
        assert all(i in defined for i in step.inputs), "a step reads a value not yet computed"
        defined |= set(step.output_ids) if hasattr(step, "output_ids") else {step.id}
        if hasattr(step, "absorbed"):
            defined |= set(step.absorbed)


def test_no_group_through_a_non_elementwise_node() -> None:
    """a = exp(x); m = a @ w; c = a * m: {a, c} would be a cycle through the matmul."""
    b = Builder()
    x = b.input("x", "float64", (4, 4))
    w = b.input("w", "float64", (4, 4))
    a = b.bind("exp", x)
    m = b.bind("matmul", a, w)
    c = b.bind("mul", b.bind("mul", a, m), m)
    graph = b.build([("c", c)])
    for g in find_groups(graph):
        ids = {n.id for n in g.members}
        assert not ({a.id, c.id} <= ids)
    rng = np.random.default_rng(0)
    feed = {"x": rng.standard_normal((4, 4)), "w": rng.standard_normal((4, 4))}
    np.testing.assert_array_equal(Plan(graph, fusion=True).run(feed)["c"], Plan(graph).run(feed)["c"])


def test_no_two_groups_need_each_other() -> None:
    """p = x*k, a = x + k, s = sum(p) over the batch; o2 = select(y > a, y, p) grows a group
    {p, y > a, o2} that needs a, and o1 = a + (p - s) a group {a, p - s, o1} that needs p (through
    s): each is convex, but as single steps neither could run first. The smaller one is taken
    apart (a is returned, so no group recomputes it), with and without epilogues."""
    b = Builder()
    x, y, k = b.input("x", "float64", (4, 3)), b.input("y", "float64", (4, 3)), b.input("k", "float64", ())
    p = b.bind("mul", x, k)
    s = b.bind("reduce_sum", p, axes=(0,), keepdims=True)
    a = b.bind("add", x, k)
    r = b.bind("sub", p, s)
    o2 = b.bind("select", b.bind("gt", y, a), y, p)
    graph = b.build([("o1", b.bind("add", a, r)), ("o2", o2), ("a", a)])
    rng = np.random.default_rng(3)
    feed = {"x": rng.standard_normal((4, 3)), "y": rng.standard_normal((4, 3)), "k": np.float64(0.5)}
    want = Plan(graph).run(feed)
    for epilogues in (False, True):
        groups = find_groups(graph, epilogues=epilogues)
        assert [len(g.members) for g in groups] == [3]
        schedule(graph, groups)
        got = Plan(graph, kernels=_fused_kernels(epilogues)).run(feed)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_broadcasting_views_are_read_through_and_not_run() -> None:
    b = Builder()
    x = b.input("x", "float64", (5, 3))
    v = b.input("v", "float64", (5,))
    col = b.bind("broadcast_to", b.bind("expand_dims", v, axes=(1,)), shape=(5, 3))
    y = b.bind("tanh", b.bind("mul", b.bind("sub", x, col), b.const(np.float64(2.0))))
    graph = b.build([("y", y)])
    plan = Plan(graph, fusion=True)
    (g,) = plan.groups
    assert g.inputs[0] == 0 and g.aligned[g.inputs.index(1)] == (5, 1)  # v itself, as a (5, 1) column
    assert "views read through" in str(plan)
    assert all(step.unit.op not in ("expand_dims", "broadcast_to") for step in plan.steps if isinstance(step, KernelStep))
    rng = np.random.default_rng(1)
    feed = {"x": rng.standard_normal((5, 3)), "v": rng.standard_normal(5)}
    np.testing.assert_array_equal(plan.run(feed)["y"], Plan(graph).run(feed)["y"])


def test_fusion_is_a_planner_decision_only() -> None:
    """Graph and id unchanged; the numpy kernels give the same bits fused or not, also through
    the gradient of every spec of the primitive table (float64 and float32)."""
    graph, feed = mlp_grad_graph("float64")
    gid = graph.id
    fused = Plan(graph, fusion=True)
    assert graph.id == gid and fused.graph is graph
    plain = Plan(graph).run(feed)
    for name, value in fused.run(feed).items():
        np.testing.assert_array_equal(value, plain[name], err_msg=name)
    checked = 0
    for s in SPECS:
        for dtype in FLOATS:
            if dtype not in s.dtypes or s.grad != "smooth" or not s.reverse or out_dtype(s, dtype) not in FLOATS:
                continue
            b = Builder()
            inputs = make_inputs(s, dtype)
            xs = [b.input(k, arg_dtype(a, dtype), v.shape) for (k, v), a in zip(inputs.items(), s.args, strict=True)]
            y = b.bind(s.op, *xs, **s.attrs)
            z = b.bind("tanh", b.bind("mul", y, y))  # something to fuse with, forward and backward
            loss = b.bind("reduce_sum", z, axes=tuple(range(len(z.shape))), keepdims=False)
            wrt = [k for (k, _), a in zip(inputs.items(), s.args, strict=True) if a.kind == "x"]
            g = optimize(autodiff.grad_only(b.build([("out", loss)]), wrt, "out", keep_outputs=True))
            want = Plan(g).run(inputs)
            for name, value in Plan(g, fusion=True).run(inputs).items():
                np.testing.assert_array_equal(value, want[name], err_msg=f"{s.name} {dtype} {name}")
            checked += 1
    assert checked > 100


def test_plain_plans_are_unchanged() -> None:
    """No fusion unless asked: the default plan has no fused steps and runs the numpy path."""
    graph, _ = mlp_grad_graph("float64")
    plan = Plan(graph)
    assert not plan.groups and plan.kernel_mode == "numpy" and plan._upload is None and plan._result is None
    assert all(isinstance(step, KernelStep) for step in plan.steps)
    assert Plan(graph, kernels=KernelSet(KERNELS)).groups == []


# ---------------------------------------------------------------- native kernels against numpy


@needs_numba
@pytest.mark.parametrize(("dtype", "shape"), TABLE_CASES, ids=TABLE_IDS)
def test_every_elementwise_primitive_native_matches_numpy(native_kernels, dtype, shape) -> None:
    graph, feed, cases = elementwise_table_graph(dtype, shape)
    if not cases:
        pytest.skip(f"no elementwise spec of dtype {dtype} with result shape {shape}")
    plan = Plan(graph, kernels=native_kernels)
    assert len(plan.groups) == 1 and len(plan.groups[0].members) >= len(cases)
    got = plan.run(feed)
    want = Plan(graph).run(feed)
    for s, name, operands in cases:
        assert_close(got[name], want[name], f"{s.name} {dtype}")
        with np.errstate(all="ignore"):
            ref = np.asarray(s.ref(*(feed[k] for k in operands)))
        assert_close(got[name], ref, f"{s.name} {dtype} against the spec's reference")
    assert_close(got["acc"], want["acc"], "sum of all")


@needs_numba
@pytest.mark.parametrize("dtype", FLOATS)
def test_special_values(native_kernels, dtype) -> None:
    """inf, nan, signed zeros, overflow and underflow at the edges of exp/log & co."""
    big = 89.0 if dtype == "float32" else 710.0
    tiny = np.finfo(dtype).tiny
    values = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, -1.0, big, -big, big - 1, -(big - 1), 30.0, -30.0,
                       tiny, tiny / 8, -tiny, 1e-30, -0.999999, -1.0, 1e30, -1e30, 0.5, 20.0, -20.0], dtype=dtype)
    b = Builder()
    x = b.input("x", dtype, values.shape)
    zero = b.const(np.zeros((), dtype))
    outs = [(op, b.bind(op, x)) for op in ("exp", "expm1", "log", "log1p", "tanh", "logistic", "sqrt", "abs", "sign",
                                           "floor", "neg")]
    outs.append(("maximum", b.bind("maximum", x, b.bind("neg", x))))
    outs.append(("minimum", b.bind("minimum", x, zero)))
    acc = outs[0][1]
    for _, v in outs[1:]:
        acc = b.bind("add", acc, v)
    graph = b.build([*outs, ("acc", acc)])
    with np.errstate(all="ignore"):
        want = Plan(graph).run({"x": values})
        got = Plan(graph, kernels=native_kernels).run({"x": values})
    for name, w in want.items():
        w, g = np.asarray(w), np.asarray(got[name])
        np.testing.assert_array_equal(np.isnan(g), np.isnan(w), err_msg=name)
        fin = np.isfinite(w)
        np.testing.assert_array_equal(g[~fin & ~np.isnan(w)], w[~fin & ~np.isnan(w)], err_msg=name)
        np.testing.assert_allclose(g[fin], w[fin], rtol=TOL[dtype][0], atol=TOL[dtype][1], err_msg=name)


@needs_numba
@pytest.mark.parametrize("dtype", FLOATS)
def test_broadcast_layouts(native_kernels, dtype) -> None:
    """Rows, columns, scalars, rank extension, broadcasting in the middle, non-contiguous
    and read-only operands, an empty group: one kernel each, against numpy."""
    rng = np.random.default_rng(3)
    layouts = [((4, 6), (6,)), ((4, 6), (4, 1)), ((4, 6), ()), ((2, 3, 4), (4,)), ((2, 3, 4), (2, 1, 4)),
               ((2, 3, 4), (1, 3, 1)), ((0, 5), (5,))]
    for full, small in layouts:
        b = Builder()
        x = b.input("x", dtype, full)
        v = b.input("v", dtype, small)
        y = b.bind("exp", b.bind("mul", b.bind("sub", x, v), v))
        graph = b.build([("y", y), ("z", b.bind("add", y, x))])
        plan = Plan(graph, kernels=native_kernels)
        assert len(plan.groups) == 1
        xs = rng.standard_normal(full).astype(dtype)
        vs = rng.standard_normal(small).astype(dtype)
        feeds = [{"x": xs, "v": vs}]
        if len(full) >= 2 and full[0] == full[-1]:
            feeds.append({"x": np.ascontiguousarray(xs.swapaxes(0, -1)).swapaxes(0, -1), "v": vs})  # non-contiguous
        ro = np.frombuffer(xs.tobytes(), dtype=dtype).reshape(full)  # read-only, as arrays decoded from the wire
        feeds.append({"x": ro, "v": vs})
        for feed in feeds:
            want = Plan(graph).run(feed)
            got = plan.run(feed)
            for name in want:
                assert_close(got[name], want[name], f"{full} with {small}: {name}")


@needs_numba
@pytest.mark.parametrize("dtype", FLOATS)
def test_long_chains_run_in_stages_over_blocks(native_kernels, dtype) -> None:
    """A chain of transcendentals is cut into stages run block by block (rows longer than a
    block and not a multiple of it; values crossing stages through scratch rows and outputs)."""
    import gradserve as gs

    def f(x, w):
        h = x
        for _ in range(2):
            a = gs.tanh(h * w + 0.1)
            h = gs.log1p(gs.exp(a * -0.5)) * gs.sigmoid(a) - h * 0.25
        return gs.sum(h)

    rng = np.random.default_rng(6)
    x = rng.standard_normal((3, 2 * native.BLOCK + 37)).astype(dtype)
    w = rng.uniform(0.5, 1.5, x.shape[1]).astype(dtype)
    graph = optimize(autodiff.grad_only(gs.trace(f, x, w), ["x", "w"], "out", keep_outputs=True))
    plan = Plan(graph, kernels=native_kernels)
    big = max(plan.groups, key=lambda g: len(g.members))
    assert max(native.stages(big)) >= 2
    want = Plan(graph).run({"x": x, "w": w})
    for name, value in plan.run({"x": x, "w": w}).items():
        assert_close(value, want[name], name)


@needs_numba
def test_transposed_operand_and_stashed_buffers(native_kernels) -> None:
    """A fused group reading a transposed view (non-contiguous), whose outputs are written into
    buffers reused from dead intermediates."""
    b = Builder()
    a = b.input("a", "float64", (6, 6))
    w = b.input("w", "float64", (6, 6))
    m = b.bind("matmul", a, w)
    t = b.bind("transpose", m, perm=(1, 0))
    y = b.bind("tanh", b.bind("add", t, b.const(np.float64(0.5))))
    z = b.bind("matmul", y, w)
    u = b.bind("mul", b.bind("exp", z), z)
    graph = b.build([("u", u)])
    rng = np.random.default_rng(4)
    feed = {"a": rng.standard_normal((6, 6)), "w": rng.standard_normal((6, 6))}
    plan = Plan(graph, kernels=native_kernels)
    assert len(plan.groups) == 2
    assert_close(plan.run(feed)["u"], Plan(graph).run(feed)["u"])


def _written(plan: Plan) -> set[int]:
    """The values a plan's steps write to memory (a fused step: its results only)."""
    return {o for step in plan.steps for o in step.outs}


def _passes(plan: Plan, shape: tuple[int, ...]) -> int:
    """How many arrays of `shape` the plan's steps read or write (views, which copy nothing, aside)."""
    aval = plan.graph.aval
    return sum(sum(aval(v)[1] == shape for v in (*step.ins, *step.outs)) for step in plan.steps
               if isinstance(step, FusedStep) or step.unit.op not in VIEWS)


def _fused_kernels(epilogues: bool) -> KernelSet:
    kernels = KernelSet(KERNELS, fuse=True)
    kernels.epilogues = epilogues
    return kernels


def test_reductions_join_their_producer_as_epilogues(monkeypatch) -> None:
    """The MLP gradient's reductions run in the pass of the group making their operand: 4 over
    the last axis (the softmax's row max and row sums, cross-entropy's per-example losses and
    their cotangent's row sums) and the 3 bias gradients (over the batch). 7 steps fewer: the 6
    sums, and the logits' bias-add (one node, no group without an epilogue) runs with its row
    max as one step instead of two. The 2 operands nothing else reads are never written (with
    no recomputation, whose gains the next test counts). Same bits."""
    graph, feed = mlp_grad_graph("float64")
    monkeypatch.setattr(fusion, "MAX_RECOMPUTED", 0)
    before, after = Plan(graph, kernels=_fused_kernels(False)), Plan(graph, fusion=True)
    tails = [n for g in after.groups for n in g.epilogue]
    assert sorted((n.op, n.attrs["axes"]) for n in tails) == [("reduce_max", (1,))] + [("reduce_sum", (0,))] * 3 + [
        ("reduce_sum", (1,))] * 3
    assert len(before.steps) - len(after.steps) == 7
    assert len(_written(before)) - len(_written(after)) == 2
    first = graph.first_node_id
    users = {v: [n.id for n in graph.nodes if v in n.inputs] for v in (t.inputs[0] for t in tails)}
    assert _written(before) - _written(after) == {v for v, us in users.items() if len(us) == 1}
    assert all(graph.nodes[v - first].op != "reduce_sum" for v in _written(before) - _written(after))
    assert "in the same pass: " in str(after) and after.kernel_info()["fused_reductions"] == 7
    plain = Plan(graph).run(feed)
    for name, value in after.run(feed).items():
        np.testing.assert_array_equal(value, plain[name], err_msg=name)


def test_cheap_values_are_recomputed_where_read(monkeypatch) -> None:
    """In the MLP gradient, the group making the logits' gradient recomputes the one-hot
    cotangent (labels == classes, cast, times the loss's cotangent: from a column and a row)
    instead of reading it, and the softmax's two groups recompute the logits' bias-add from the
    matmul's result, which they read instead: neither is written any more (2 arrays), in as
    many steps, and the steps read or write 3 arrays of the logits' shape fewer (12 -> 9).
    Same bits. A backend declining the groups that recompute gets the values from steps of
    their own (the bias-add's owner, which runs, does not write it)."""
    graph, feed = mlp_grad_graph("float64")
    first = graph.first_node_id
    logits = graph.aval(graph.first_node_id + 6)[1]  # %20 = h @ w3
    assert logits == (32, 6) and graph.nodes[6].op == "matmul"
    plain = Plan(graph).run(feed)
    after = Plan(graph, fusion=True)
    recomputed = sorted(tuple(graph.nodes[v - first].op for v in g.recomputed) for g in after.groups if g.recomputed)
    assert recomputed == [("add",), ("add",), ("eq", "cast", "mul_no_nan")]
    assert all(not {g.members[j].id for j in g.outputs} & set(g.recomputed) for g in after.groups)
    assert "(recomputed: " in str(after)

    class Declining(KernelSet):
        def compile_group(self, group):
            return None if group.recomputed else super().compile_group(group)

    declined = Plan(graph, kernels=Declining(KERNELS, fuse=True))
    (owner,) = [g for g in declined.groups if any(n.op == "reduce_max" for n in g.epilogue)]
    assert not owner.outputs and owner.members[0].id in _written(declined)  # the bias-add, run again alone
    for plan in (after, declined):
        for name, value in plan.run(feed).items():
            np.testing.assert_array_equal(value, plain[name], err_msg=name)

    monkeypatch.setattr(fusion, "MAX_RECOMPUTED", 0)
    before = Plan(graph, fusion=True)
    assert not any(g.recomputed for g in before.groups)
    assert len(before.steps) == len(after.steps)
    gone = _written(before) - _written(after)
    assert sorted(graph.nodes[v - first].op for v in gone) == ["add", "mul_no_nan"] and _written(after) < _written(before)
    assert (_passes(before, logits), _passes(after, logits)) == (12, 9)


@pytest.mark.parametrize(("shapes", "big"), [(((5, 1), (1, 5), (5, 5)), (3, 5, 5)),
                                             (((2, 1, 1), (1, 1, 3), (2, 1, 3)), (2, 4, 3))], ids=["ranks", "same rank"])
def test_a_value_is_recomputed_only_in_groups_of_its_own_shape(shapes, big) -> None:
    """A cheap value read by a group of its own shape and, through broadcasting, by a larger one:
    the first may recompute it, the second reads it (the planner used to hand both the cone)."""
    import gradserve as gs

    def f(x1, x2, x4, x3):
        v = x1 * x2  # cheap, from operands smaller than v
        c = gs.tanh(x3 * v)  # a group of the larger shape reads v
        a = gs.tanh(v + gs.exp(v * x4) @ x4.swapaxes(-1, -2))  # groups of v's shape read it
        return gs.sum(c) + gs.sum(a)

    rng = np.random.default_rng(3)
    args = [rng.standard_normal(s) for s in (*shapes, big)]
    graph = optimize(gs.trace(f, *args))
    feed = dict(zip([i.name for i in graph.inputs], args, strict=True))
    want = Plan(graph).run(feed)
    for plan in (Plan(graph, fusion=True), Plan(graph, kernels=native.NativeKernels())):
        for g in plan.groups:
            assert all(graph.aval(v)[1] == g.shape for v in g.recomputed), g.text()
        for name, value in plan.run(feed).items():
            np.testing.assert_allclose(value, want[name], rtol=1e-12, err_msg=name)
    plan = Plan(graph, fusion=True)  # each node counted once: fused, reduced in a group's pass, absorbed, or a step
    info = plan.kernel_info()
    absorbed = len({v for g in plan.groups for v in g.absorbed})
    kernel_steps = sum(not isinstance(step, FusedStep) for step in plan.steps)
    assert info["recomputed_nodes"] > 0
    assert info["fused_nodes"] + info["fused_reductions"] + absorbed + kernel_steps == len(graph.nodes)


# (x's shape, v's shape, whether tanh's values are a result too); d = x - v, e = exp(d), y = tanh(e * v),
# results: over the last axis sum(e) with keepdims, sum(y) without, max(d) without, min(y) with; from
# rank 2, over every axis but the last sum(y) and min(d), over every axis sum(e) with keepdims and max(d)
# without (d is exact in both backends: its max and min are compared bit for bit)
EPILOGUE_LAYOUTS = [((5, 7), (7,), True), ((5, 7), (5, 1), False), ((2, 3, 600), (1, 3, 1), True),
                    ((9,), (), False), ((3, 1), (1,), True), ((3, 0), (3, 1), True), ((0, 5), (5,), False)]


def _epilogue_graph(dtype: str, full: tuple[int, ...], small: tuple[int, ...], keep_y: bool, rows: bool = True) -> Graph:
    b = Builder()
    x = b.input("x", dtype, full)
    v = b.input("v", dtype, small)
    d = b.bind("sub", x, v)
    e = b.bind("exp", d)
    y = b.bind("tanh", b.bind("mul", e, v))
    rank = len(full)
    last, but_last, every = (rank - 1,), tuple(range(rank - 1)), tuple(range(rank))
    outs = []

    def extrema(*cases):  # (name, op, operand, axes, keepdims); none over an empty axis (an error)
        return [(name, b.bind(op, val, axes=axes, keepdims=keep)) for name, op, val, axes, keep in cases
                if all(full[a] for a in axes)]

    if rows:
        outs += [("se", b.bind("reduce_sum", e, axes=last, keepdims=True)),
                 ("sy", b.bind("reduce_sum", y, axes=last, keepdims=False)),
                 *extrema(("xd", "reduce_max", d, last, False), ("ny", "reduce_min", y, last, True))]
    if rank >= 2:
        outs += [("cy", b.bind("reduce_sum", y, axes=but_last, keepdims=False)),
                 ("ae", b.bind("reduce_sum", e, axes=every, keepdims=True)),
                 *extrema(("cd", "reduce_min", d, but_last, False), ("ad", "reduce_max", d, every, False))]
    return b.build(outs + [("y", y)] * keep_y)


def _assert_epilogues_match(got: dict, want: dict, what: str) -> None:
    """Sums to the tolerances; the max and min of d (exact in both backends) bit for bit,
    nan and infinities where numpy's np.max and np.min have them."""
    assert got.keys() == want.keys()
    for name in want:
        if name.endswith("d"):
            assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, f"{what}: {name}"
            np.testing.assert_array_equal(got[name], want[name], err_msg=f"{what}: {name}")
        else:
            assert_close(got[name], want[name], f"{what}: {name}")


@needs_numba
@pytest.mark.parametrize("dtype", FLOATS)
def test_epilogue_reductions_native_match_numpy(native_kernels, dtype) -> None:
    """Sums, max and min over the last axis, every axis but the last, and every axis, in the
    pass of their producer (values from scratch rows and from an output, rows longer than a
    block, row and column broadcasts, rank 1 to 3, keepdims or not, empty axes, a size-1 last
    axis left alone), against the unfused numpy plan; then again with nan and inf in a row, a
    row of -inf and a row of +inf (a max starts from -inf, a min from +inf, nan wins)."""
    rng = np.random.default_rng(8)
    for full, small, keep_y in EPILOGUE_LAYOUTS:
        graph = _epilogue_graph(dtype, full, small, keep_y)
        plan = Plan(graph, kernels=native_kernels)
        (g,) = plan.groups
        reductions = len(graph.outputs) - keep_y
        assert len(g.epilogue) == (0 if full[-1] == 1 else reductions), f"{full}: {g.text()}"
        assert len(plan.steps) == (1 if g.epilogue else 1 + reductions)
        x = rng.standard_normal(full).astype(dtype)
        feed = {"x": x, "v": rng.uniform(0.5, 1.5, small).astype(dtype)}
        _assert_epilogues_match(plan.run(feed), Plan(graph).run(feed), f"{full} with {small}")
        if x.ndim == 2 and x.shape[0] >= 4 and x.shape[1] >= 2:
            x = x.copy()
            x[0, 1], x[1, 0], x[2], x[3] = np.nan, np.inf, -np.inf, np.inf
            feed["x"] = x
            _assert_epilogues_match(plan.run(feed), Plan(graph).run(feed), f"{full} with {small}, special values")


@needs_numba
def test_epilogue_rows_on_the_thread_pool(monkeypatch) -> None:
    """Groups with epilogues large enough for the pool, against numpy: with row reductions,
    tiles are whole rows (each row reduced by one thread), column reductions and the totals
    combine one row of partial column results per chunk of tiles; without row reductions, few
    long rows are cut into pieces (float32 only: the compiles are what takes time)."""
    monkeypatch.setattr(native, "PARALLEL_MIN_WORK", 1)
    kernels = native.NativeKernels(min_elements=0, threads=2)
    rng = np.random.default_rng(9)
    for dtype, full, rows in (("float64", (64, 300), True), ("float32", (64, 300), True), ("float32", (3, 9001), False)):
        graph = _epilogue_graph(dtype, full, full[1:], True, rows)
        plan = Plan(graph, kernels=kernels)
        (g,) = plan.groups
        assert len(g.epilogue) == len(graph.outputs) - 1
        calls = threads_.pool().calls
        x = rng.standard_normal(full).astype(dtype)
        feed = {"x": x, "v": rng.uniform(0.5, 1.5, full[1:]).astype(dtype)}
        _assert_epilogues_match(plan.run(feed), Plan(graph).run(feed), f"{dtype} {full}")
        assert threads_.pool().calls > calls, "the group did not run on the thread pool"
        feed["x"] = x.copy()
        feed["x"][-1, -1] = np.nan  # in the last chunk of tiles: the chunks' partial results keep it
        _assert_epilogues_match(plan.run(feed), Plan(graph).run(feed), f"{dtype} {full} with a nan")


@needs_numba
@pytest.mark.parametrize("dtype", FLOATS)
def test_mlp_gradient_native_matches_numpy(native_kernels, dtype) -> None:
    """The MLP gradient's native plan: 27 steps (56 unfused); 24 of the unfused plan's 56
    arrays never written; 9 reads or writes of a (32, 6) array, the logits' shape. (28, 22 and
    13 when only sums were epilogues and nothing was recomputed: the row max joined the logits'
    bias-add, which with the one-hot cotangent is now recomputed where read; see the two tests
    above.) Values as numpy's."""
    graph, feed = mlp_grad_graph(dtype)
    plan = Plan(graph, kernels=native_kernels)
    unfused = Plan(graph)
    assert plan.kernel_mode == "native" and len(plan.groups) >= 5
    assert (len(plan.steps), len(unfused.steps), len(_written(unfused) - _written(plan))) == (27, 56, 24)
    assert _passes(plan, (32, 6)) == 9
    want = unfused.run(feed)
    for name, value in plan.run(feed).items():
        assert_close(value, want[name], name)


@needs_numba
@pytest.mark.parametrize("dtype", FLOATS)
def test_softmax_cross_entropy_native(native_kernels, dtype) -> None:
    """Cross-entropy of 512 x 1000 logits, forward and backward: the logits' row max is an
    epilogue of the group making them (x * w + b), which writes nothing else: the softmax's
    groups recompute the logits from x, and the gradient's group the one-hot. The plan reads
    or writes 7 arrays of the logits' shape (20 with no epilogue and no recomputation, 10 with
    epilogues alone, 11 when only sums were epilogues). Values as the numpy plan's, with a nan,
    +inf, -inf, an all -inf row, two +inf in a row and ties; gradients as PyTorch's."""
    graph, feed = ce_grad_graph(dtype)
    plan = Plan(graph, kernels=native_kernels)
    (g,) = [g for g in plan.groups if any(n.op == "reduce_max" for n in g.epilogue)]
    (m,) = g.epilogue
    assert g.ops == ("mul", "add") and not g.outputs and m.attrs["axes"] == (1,)
    assert f"in the same pass: %{m.id}=reduce_max %{m.inputs[0]}" in str(plan)
    assert _passes(plan, CE_SHAPE) == 7
    assert _passes(Plan(graph, kernels=_fused_kernels(True)), CE_SHAPE) == 7
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fusion, "MAX_RECOMPUTED", 0)
        assert _passes(Plan(graph, kernels=_fused_kernels(False)), CE_SHAPE) == 20
        assert _passes(Plan(graph, kernels=_fused_kernels(True)), CE_SHAPE) == 10

    unfused = Plan(graph)
    got = plan.run(feed)
    want = unfused.run(feed)
    for name in want:
        assert_close(got[name], want[name], name)
    tx, tw, tb = (torch.tensor(feed[k], requires_grad=True) for k in "xwb")
    loss = torch.nn.functional.cross_entropy(tx * tw + tb, torch.tensor(feed["y"]))
    rtol = 1e-10 if dtype == "float64" else 1e-4
    np.testing.assert_allclose(got["out"], loss.detach().numpy(), rtol=rtol)
    for k, t in zip("xwb", torch.autograd.grad(loss, [tx, tw, tb]), strict=True):
        t = t.numpy()
        np.testing.assert_allclose(got[f"%grad:{k}"], t, rtol=rtol, atol=rtol * float(np.max(np.abs(t))), err_msg=k)

    infinite, nan = feed["x"].copy(), feed["x"].copy()
    infinite[1, 4], infinite[2, 10:20], infinite[4, [7, 9]] = np.inf, -np.inf, np.inf
    nan[0, 3], nan[3] = np.nan, -np.inf  # the gradients of w and b are all nan then
    for what, x in (("inf", infinite), ("nan", nan)):
        special = {**feed, "x": x}
        got, want = plan.run(special), unfused.run(special)
        for name in want:
            assert_close(got[name], want[name], f"{name}, {what} rows")


@needs_numba
def test_gs_grad_through_native_plans_matches_pytorch(native_kernels) -> None:
    """gs.grad of the MLP's loss on an engine with native kernels: PyTorch's gradients to 1e-10."""
    engine = Engine(kernels="native")
    api = Functional(engine)
    params, x, y = mlp_data("float64")
    grads = api.grad(mlp_loss)(params, x, y)
    want = torch_mlp_grads(params, x, y)
    plans = list(engine._plans.values())
    assert plans and all(p.kernel_mode == "native" and p.groups for p in plans)
    assert engine.cache_info().kernels.startswith("native")
    for k, g in grads.items():
        np.testing.assert_allclose(g, want[k], rtol=1e-10, atol=1e-12, err_msg=k)
    again = api.grad(mlp_loss)(params, x, y)  # the cached plan: no compilation in the steady state
    assert len(engine._plans) == len(plans)
    for k in grads:
        np.testing.assert_array_equal(again[k], grads[k])


@needs_numba
def test_large_groups_run_on_threads_and_concurrent_plans(native_kernels) -> None:
    """A group big enough for the thread pool; two plans at once (one finds the pool busy and
    runs its tiles itself): same results as numpy."""
    shape = (512, 1024)
    assert math.prod(shape) * (8 + 0.5) >= native.PARALLEL_MIN_WORK
    b = Builder()
    x = b.input("x", "float32", shape)
    bias = b.input("b", "float32", shape[1:])
    y = b.bind("tanh", b.bind("add", x, bias))
    graph = b.build([("y", y)])
    plan = Plan(graph, kernels=native.NativeKernels(min_elements=0, threads=2))
    rng = np.random.default_rng(5)
    feeds = [{"x": rng.standard_normal(shape).astype("float32"), "b": rng.standard_normal(shape[1]).astype("float32")}
             for _ in range(4)]
    wants = [Plan(graph).run(f)["y"] for f in feeds]
    errors = []

    def work(k):
        try:
            for _ in range(5):
                assert_close(plan.run(feeds[k])["y"], wants[k])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    assert threads_.pool().calls > 0, "the group did not run on the thread pool"


# ---------------------------------------------------------------- compilation, cache, selection


@needs_numba
def test_compiled_once_cached_on_disk_and_timed(tmp_path) -> None:
    b = Builder()
    x = b.input("x", "float64", (3, 5))
    y = b.bind("log1p", b.bind("mul", x, x))  # a signature no other test compiles
    graph = b.build([("y", y)])
    ks = native.NativeKernels(min_elements=0, cache_dir=tmp_path)
    plan = Plan(graph, kernels=ks)
    assert plan.compile_seconds > 0
    (src,) = tmp_path.glob("k_*.py")
    assert "def kernel(" in src.read_text() and "log1p" in src.read_text()
    assert "from gradserve_engine.native_math import log1p as _log1p\n" in src.read_text()  # imported, not pasted
    assert list((tmp_path / "__pycache__").glob(src.stem + ".kernel-*.nbi")), "numba wrote no cache index"
    again = Plan(graph, kernels=ks)
    assert again.compile_seconds < plan.compile_seconds  # loaded, not compiled
    feed = {"x": np.linspace(0, 1, 15).reshape(3, 5)}
    np.testing.assert_allclose(again.run(feed)["y"], np.log1p(feed["x"] ** 2), rtol=1e-12)


@needs_numba
def test_kernel_files_follow_the_math_module(tmp_path, monkeypatch) -> None:
    """numba's disk cache of a kernel does not notice edits to the native_math functions it
    inlines, so each kernel file's name covers native_math.py's bytes: other bytes, another file."""
    from gradserve_engine import native_math

    assert native.math_digest() == hashlib.sha256(Path(native_math.__file__).read_bytes()).digest()
    b = Builder()
    x = b.input("x", "float64", (2, 7))
    graph = b.build([("y", b.bind("expm1", b.bind("add", x, x)))])  # a signature no other test compiles
    ks = native.NativeKernels(min_elements=0, cache_dir=tmp_path)
    Plan(graph, kernels=ks)
    (first,) = tmp_path.glob("k_*.py")
    monkeypatch.setattr(native, "_math_digest", hashlib.sha256(b"an edited native_math.py").digest())
    plan = Plan(graph, kernels=ks)
    files = sorted(tmp_path.glob("k_*.py"))
    assert len(files) == 2 and first in files and files[0].read_text() == files[1].read_text()
    feed = {"x": np.linspace(-1, 1, 14).reshape(2, 7)}
    np.testing.assert_allclose(plan.run(feed)["y"], np.expm1(2 * feed["x"]), rtol=1e-12)


def test_resolve_kernels_modes() -> None:
    assert native.resolve_kernels("numpy").name == "numpy"
    with pytest.raises(ValueError, match="native"):
        native.resolve_kernels("fast")
    if native.numba_status()[0] is not None:
        ks = native.resolve_kernels("native")
        assert ks.name == "native" and ks.min_elements == 0 and "numba" in ks.describe()
        auto = native.resolve_kernels("auto")
        assert auto.name == "native" and auto.min_elements == native.AUTO_MIN_ELEMENTS
        assert not auto.accept(types.SimpleNamespace(op="sin")) and auto.accept(types.SimpleNamespace(op="tanh"))
        graph, _ = mlp_grad_graph("float64")  # 32 x 40: every group under the threshold
        small = Plan(graph, kernels=auto)
        assert small.groups == [] and small.kernel_mode == "native"


def test_fallback_without_numba(monkeypatch) -> None:
    """numba not importable: "native" and "auto" run the numpy kernels and say why."""
    monkeypatch.setitem(sys.modules, "numba", None)  # `import numba` raises ImportError
    native.reset_numba_status()
    try:
        for mode in ("native", "auto"):
            ks = native.resolve_kernels(mode)
            assert ks.name == "numpy" and "numba is not importable" in ks.reason and mode in ks.reason
            graph, feed = mlp_grad_graph("float64")
            plan = Plan(graph, kernels=ks)
            assert plan.kernel_mode == "numpy"
            want = Plan(graph).run(feed)
            for name, value in plan.run(feed).items():
                np.testing.assert_array_equal(value, want[name])
    finally:
        monkeypatch.undo()
        native.reset_numba_status()
    assert native.numba_status()[0] is not None or "numba" not in sys.modules


def test_engine_imports_without_numba() -> None:
    """Only the generated kernels import native_math (and with it numba): without numba the
    SDK, the engine and the server import, and "native" falls back to the numpy kernels."""
    import gradserve
    import gradserve_engine
    import gradserve_server

    code = ("import sys\n"
            "sys.modules['numba'] = None\n"
            "import gradserve, gradserve_server.app\n"
            "from gradserve_engine import engine, native, plan\n"
            "assert native.resolve_kernels('native').name == 'numpy'\n"
            "assert 'gradserve_engine.native_math' not in sys.modules\n")
    roots = [str(Path(m.__file__).parents[1]) for m in (gradserve, gradserve_engine, gradserve_server)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*roots, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
