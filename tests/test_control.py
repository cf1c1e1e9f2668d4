"""Control flow and custom rules as higher-order primitives (`gs.cond`, `gs.switch`, `gs.scan`,
`gs.fori_loop`, `gs.custom_vjp`): values against Python loops in numpy, gradients against
central finite differences and PyTorch, forward mode, second order, the server; and the IR's
subgraph attributes (wire round trips, content ids, validation and limits that recurse)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

import gradserve as gs
from gradserve_engine import ir
from gradserve_engine.engine import Engine
from gradserve_engine.errors import GraphError, LimitError, ShapeError
from gradserve_engine.ir import Builder, Graph, Limits
from gradserve_engine.plan import Plan
from gradserve_engine.v1 import graph_pb2 as pb

EPS = 1e-6


def fd_grad(f: Callable[..., float], args: list[np.ndarray], k: int) -> np.ndarray:
    """Central differences of scalar f with respect to args[k]."""
    x = np.asarray(args[k], dtype=np.float64)
    g = np.zeros_like(x)
    for i in range(x.size):
        hi, lo = x.copy(), x.copy()
        hi.flat[i] += EPS
        lo.flat[i] -= EPS
        g.flat[i] = (f(*args[:k], hi, *args[k + 1:]) - f(*args[:k], lo, *args[k + 1:])) / (2 * EPS)
    return g


def torch_grads(f: Callable[..., torch.Tensor], args: list[np.ndarray]) -> list[np.ndarray]:
    ts = [torch.tensor(a, requires_grad=True) for a in args]
    return [g.numpy() for g in torch.autograd.grad(f(*ts), ts)]


RNG = np.random.default_rng(16)
X = RNG.normal(size=(3,))
W = RNG.normal(size=(3,))
XS = RNG.normal(size=(6, 3))


# ---------------------------------------------------------------- cond and switch


def f_cond(x, w):
    y = gs.cond(gs.sum(x * w) > 0, lambda a: gs.sin(a) * w, lambda a: a * a - w, x)
    return gs.sum(y * y)


def ref_cond(x, w, lib=np):
    y = lib.sin(x) * w if (x * w).sum() > 0 else x * x - w
    return (y * y).sum()


def f_switch(x, w, i):
    branches = [lambda a, b: a * b, lambda a, b: gs.exp(a) + b, lambda a, b: gs.tanh(a - b)]
    return gs.sum(gs.switch(i, branches, x, w) ** 2)


def ref_switch(x, w, i, lib=np):
    y = [x * w, lib.exp(x) + w, lib.tanh(x - w)][min(max(int(i), 0), 2)]
    return (y ** 2).sum()


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_cond_value_and_gradient_match_numpy_fd_and_torch(sign):
    x = sign * np.abs(X)
    w = np.abs(W)
    assert gs.trace(f_cond, x, w).nodes  # traced once: one switch node, whichever branch the data takes
    np.testing.assert_allclose(f_cond(x, w), ref_cond(x, w), rtol=1e-12)
    gx, gw = gs.grad(f_cond, argnums=(0, 1))(x, w)
    np.testing.assert_allclose(gx, fd_grad(ref_cond, [x, w], 0), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(gw, fd_grad(ref_cond, [x, w], 1), rtol=1e-6, atol=1e-8)
    tx, tw = torch_grads(lambda a, b: ref_cond(a, b, torch), [x, w])
    np.testing.assert_allclose(gx, tx, rtol=1e-12)
    np.testing.assert_allclose(gw, tw, rtol=1e-12)


@pytest.mark.parametrize("i", [-2, 0, 1, 2, 7])
def test_switch_takes_the_clipped_branch_with_its_gradient(i):
    g = gs.trace(f_switch, X, W, np.int32(i))
    assert [n.op for n in g.nodes].count("switch") == 1
    np.testing.assert_allclose(f_switch(X, W, np.int32(i)), ref_switch(X, W, i), rtol=1e-12)
    # the index traced (an int32 input): one graph serves every branch
    got = gs.grad(f_switch, argnums=(0, 1))(X, W, np.int32(i))
    for k in (0, 1):
        np.testing.assert_allclose(got[k], fd_grad(lambda a, b: ref_switch(a, b, i), [X, W], k), rtol=1e-6, atol=1e-8)


def test_cond_jvp_hessian_and_jacobian():
    x, w = np.abs(X), np.abs(W)
    v = RNG.normal(size=3)
    _, tangent = gs.jvp(lambda a: f_cond(a, w), (x,), (v,))
    np.testing.assert_allclose(tangent, fd_grad(ref_cond, [x, w], 0) @ v, rtol=1e-6)
    h = gs.hessian(lambda a: f_cond(a, w))(x)
    th = torch.autograd.functional.hessian(lambda a: ref_cond(a, torch.tensor(w), torch), torch.tensor(x)).numpy()
    np.testing.assert_allclose(h, th, rtol=1e-10, atol=1e-12)
    jac = gs.jacobian(lambda a: gs.cond(a[0] > 0, lambda b: b * w, lambda b: gs.sin(b), a))(x)
    np.testing.assert_allclose(jac, np.diag(w), rtol=1e-12)


def test_cond_with_several_outputs_of_mixed_dtypes_and_pytrees():
    def f(x):
        out = gs.cond(x[0] > 0, lambda a: {"v": a * 2.0, "n": gs.astype(a, np.int64)},
                      lambda a: {"v": -a, "n": gs.astype(a * 10.0, np.int64)}, x)
        return gs.sum(out["v"]) + gs.sum(gs.astype(out["n"], np.float64))

    for x in (np.array([1.5, 2.5]), np.array([-1.5, 2.5])):
        want = (2 * x).sum() + x.astype(np.int64).sum() if x[0] > 0 else (-x).sum() + (x * 10).astype(np.int64).sum()
        np.testing.assert_allclose(f(x), want)
        np.testing.assert_allclose(gs.grad(f)(x), np.full(2, 2.0 if x[0] > 0 else -1.0))


def test_cond_branches_close_over_traced_values_and_nest():
    def f(x, w):
        def inner(a):
            return gs.cond(gs.sum(a) > 1.0, lambda b: b * w, lambda b: b + w, a)  # w: closed over, two levels up
        return gs.sum(gs.cond(x[0] > 0, inner, lambda a: a * 3.0, x))

    def ref(x, w):
        if x[0] > 0:
            return (x * w).sum() if x.sum() > 1.0 else (x + w).sum()
        return (3 * x).sum()

    for x in (np.array([2.0, 0.5, 0.1]), np.array([0.1, 0.2, 0.1]), np.array([-1.0, 2.0, 0.0])):
        np.testing.assert_allclose(f(x, W), ref(x, W), rtol=1e-12)
        for k, g in enumerate(gs.grad(f, argnums=(0, 1))(x, W)):
            np.testing.assert_allclose(g, fd_grad(ref, [x, W], k), rtol=1e-6, atol=1e-8)


def test_cond_refuses_branches_that_disagree_and_bad_predicates():
    with pytest.raises(ShapeError, match="branch 1 returns"):
        gs.trace(lambda x: gs.cond(x[0] > 0, lambda a: a, lambda a: a[:2], x), X)
    with pytest.raises(ShapeError, match="predicate must be a scalar"):
        gs.trace(lambda x: gs.cond(x > 0, lambda a: a, lambda a: a, x), X)
    with pytest.raises(TypeError, match="non-empty sequence of callables"):
        gs.trace(lambda x: gs.switch(gs.astype(x[0], np.int32), [], x), X)


def test_concrete_predicates_choose_in_python():
    assert gs.cond(True, lambda a: a + 1, lambda a: a - 1, 1.0) == 2.0
    assert gs.switch(5, [lambda: "a", lambda: "b"]) == "b"


# ---------------------------------------------------------------- scan and fori_loop


def f_scan(c0, w, xs):
    def body(c, x):
        c = gs.tanh(c * w + x)
        return c, gs.sum(c * x)
    c, ys = gs.scan(body, c0, xs)
    return gs.sum(c) + gs.sum(ys * ys)


def ref_scan(c0, w, xs, lib=np, reverse=False):
    c, total = c0, 0.0
    for t in reversed(range(len(xs))) if reverse else range(len(xs)):
        c = lib.tanh(c * w + xs[t])
        total = total + (c * xs[t]).sum() ** 2
    return c.sum() + total


def test_scan_is_one_node_and_matches_a_python_loop():
    g = gs.trace(f_scan, X, W, XS)
    assert [n.op for n in g.nodes].count("scan") == 1
    np.testing.assert_allclose(f_scan(X, W, XS), ref_scan(X, W, XS), rtol=1e-12)
    long = RNG.normal(size=(1000, 3)) * 0.1
    assert len(gs.trace(f_scan, X, W, long).nodes) == len(g.nodes)  # 1,000 steps: the same graph size
    np.testing.assert_allclose(f_scan(X, W, long), ref_scan(X, W, long), rtol=1e-10)


def test_scan_gradients_match_fd_and_torch_for_init_consts_and_xs():
    got = gs.grad(f_scan, argnums=(0, 1, 2))(X, W, XS)
    want = torch_grads(lambda c, w, xs: ref_scan(c, w, xs, torch), [X, W, XS])
    for k in range(3):
        np.testing.assert_allclose(got[k], want[k], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(got[k], fd_grad(ref_scan, [X, W, XS], k), rtol=1e-6, atol=1e-8)


def test_reverse_scan_jvp_jacobian_and_hessian():
    def f(c0, w, xs):
        def body(c, x):
            c = gs.tanh(c * w + x)
            return c, gs.sum(c * x)
        c, ys = gs.scan(body, c0, xs, reverse=True)
        return gs.sum(c) + gs.sum(ys * ys)

    def ref(c0, w, xs, lib=np):
        return ref_scan(c0, w, xs, lib, reverse=True)

    np.testing.assert_allclose(f(X, W, XS), ref(X, W, XS), rtol=1e-12)
    v = RNG.normal(size=3)
    _, tangent = gs.jvp(lambda w: f(X, w, XS), (W,), (v,))
    np.testing.assert_allclose(tangent, fd_grad(ref, [X, W, XS], 1) @ v, rtol=1e-6)
    h = gs.hessian(lambda w: f(X, w, XS))(W)
    th = torch.autograd.functional.hessian(lambda w: ref(torch.tensor(X), w, torch.tensor(XS), torch), torch.tensor(W))
    np.testing.assert_allclose(h, th.numpy(), rtol=1e-9, atol=1e-11)


def test_scan_with_pytree_carry_int_counter_and_no_xs():
    def f(w):
        def body(carry, _):
            k, v = carry["k"], carry["v"]
            return {"k": k + 1, "v": v * w + gs.astype(k, np.float64)}, v
        carry, ys = gs.scan(body, {"k": np.int64(0), "v": np.ones(3)}, None, length=4)
        return gs.sum(carry["v"]) + gs.sum(ys), carry["k"]

    def ref(w):
        v, total = np.ones(3), 0.0
        for k in range(4):
            total += v.sum()
            v = v * w + k
        return v.sum() + total

    value, k = f(W)
    np.testing.assert_allclose(value, ref(W), rtol=1e-12)
    assert int(k) == 4
    np.testing.assert_allclose(gs.grad(lambda w: f(w)[0])(W), fd_grad(ref, [W], 0), rtol=1e-6, atol=1e-8)


def test_fori_loop_rk4_ode_gradient_matches_finite_differences():
    """dy/dt = -k y + sin(t), integrated with RK4 under fori_loop: d y(T) / dk."""
    dt, steps = 0.05, 40

    def solve(k, y0, lib_sin=np.sin):
        def step(i, y):
            t = i * dt
            k1 = -k * y + lib_sin(t)
            k2 = -k * (y + dt / 2 * k1) + lib_sin(t + dt / 2)
            k3 = -k * (y + dt / 2 * k2) + lib_sin(t + dt / 2)
            k4 = -k * (y + dt * k3) + lib_sin(t + dt)
            return y + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        return step

    def f(k, y0):
        return gs.sum(gs.fori_loop(0, steps, lambda i, y: solve(k, y0, gs.sin)(gs.astype(i, np.float64), y), y0))

    def ref(k, y0):
        y = y0
        for i in range(steps):
            y = solve(k, y0)(float(i), y)
        return y.sum()

    k, y0 = np.array(0.7), np.array([1.0, -0.5])
    np.testing.assert_allclose(f(k, y0), ref(k, y0), rtol=1e-12)
    gk, gy = gs.grad(f, argnums=(0, 1))(k, y0)
    np.testing.assert_allclose(gk, fd_grad(ref, [k, y0], 0), rtol=1e-6)
    np.testing.assert_allclose(gy, fd_grad(ref, [k, y0], 1), rtol=1e-6)


def test_scan_refuses_carry_changes_and_bad_lengths():
    with pytest.raises(ShapeError, match="carry output"):
        gs.trace(lambda x: gs.scan(lambda c, x: (c[:2], x), x, XS)[0], X)
    with pytest.raises(ShapeError, match="disagree"):
        gs.trace(lambda x: gs.scan(lambda c, x: (c, x), x, XS, length=3)[0], X)
    with pytest.raises(TypeError, match="pair"):
        gs.trace(lambda x: gs.scan(lambda c, x: c, x, XS)[0], X)


def test_concrete_loops_run_in_python():
    c, ys = gs.scan(lambda c, x: (c + x, c * x), 0.0, np.arange(4.0))
    assert c == 6.0 and np.array_equal(ys, [0.0, 0.0, 2.0, 9.0])
    assert gs.fori_loop(0, 5, lambda i, v: v + i, 0) == 10


# ---------------------------------------------------------------- custom_jvp


@gs.custom_jvp
def softplus(x):
    return gs.log(1.0 + gs.exp(x))


@softplus.defjvp
def _softplus_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    return softplus(x), t * (1.0 - 1.0 / (1.0 + gs.exp(x)))  # stable where exp(x) overflows


def test_custom_jvp_forward_reverse_and_second_order_use_the_rule():
    x = np.array([-3.0, 0.0, 2.0, 800.0])
    assert [n.op for n in gs.trace(softplus, x).nodes] == ["custom_jvp"]
    sig = 1 / (1 + np.exp(-x))
    with np.errstate(over="ignore"):
        np.testing.assert_allclose(softplus(x[:3]), np.log1p(np.exp(x[:3])), rtol=1e-12)
    np.testing.assert_allclose(gs.jvp(softplus, (x,), (np.ones(4),))[1], sig, rtol=1e-12)
    g = gs.grad(lambda a: gs.sum(softplus(a) * 2.0))(x)
    np.testing.assert_allclose(g, 2 * sig, rtol=1e-12)  # the rule's transpose: finite at 800, where exp overflows
    np.testing.assert_allclose(gs.jacobian(softplus)(x), np.diag(sig), rtol=1e-12)
    h = gs.hessian(lambda a: gs.sum(softplus(a)))(x[:3])  # (the rule's own derivative overflows at 800)
    np.testing.assert_allclose(h, np.diag(sig[:3] * (1 - sig[:3])), rtol=1e-10)
    tx = torch.tensor(x[:3], requires_grad=True)
    (want,) = torch.autograd.grad(torch.nn.functional.softplus(tx).sum() * 2.0, tx)
    np.testing.assert_allclose(g[:3], want.numpy(), rtol=1e-12)


def test_custom_jvp_refusals():
    @gs.custom_jvp
    def f(x):
        return x * 2.0

    with pytest.raises(TypeError, match="defjvp"):
        gs.trace(f, X)
    f.defjvp(lambda p, t: (p[0] * 2.0, (t[0] * 2.0)[:2]))
    with pytest.raises(ShapeError, match="jvp rule of f returns"):
        gs.trace(f, X)
    f.defjvp(lambda p, t: p[0] * 2.0)
    with pytest.raises(TypeError, match=r"must return \(primal_out, tangent_out\)"):
        gs.trace(f, X)


# ---------------------------------------------------------------- while_loop


def f_while(x, w):
    def body(c):
        i, v = c
        return i + 1, v * w + 0.1
    return gs.sum(gs.while_loop(lambda c: gs.sum(c[1]) < 50.0, body, (np.int32(0), x))[1])


def ref_while(x, w):
    v = x
    while v.sum() < 50.0:
        v = v * w + 0.1
    return v.sum()


def test_while_loop_value_forward_mode_and_reverse_refusal():
    x, w = np.array([1.0, 2.0]), np.array([1.5, 1.2])
    assert [n.op for n in gs.trace(f_while, x, w).nodes].count("while") == 1  # the int32 counter's node: unused, dropped
    np.testing.assert_allclose(f_while(x, w), ref_while(x, w), rtol=1e-12)
    v = RNG.normal(size=2)
    for k, (fk, args) in enumerate(((lambda a: f_while(a, w), (x,)), (lambda a: f_while(x, a), (w,)))):
        _, tangent = gs.jvp(fk, args, (v,))
        np.testing.assert_allclose(tangent, fd_grad(ref_while, [x, w], k) @ v, rtol=1e-6)
    with pytest.raises(GraphError, match="reverse-mode differentiation does not work through a while loop"):
        gs.grad(f_while)(x, w)


def test_fori_loop_with_a_traced_bound_is_a_while_loop():
    def f(x, n):
        return gs.sum(gs.fori_loop(0, n, lambda i, v: v * 2.0 + gs.astype(i, np.float64), x))

    x = np.array([0.5, -1.0])
    for n in (0, 1, 4):
        want = x.copy()
        for i in range(n):
            want = want * 2.0 + i
        np.testing.assert_allclose(f(x, np.int32(n)), want.sum(), rtol=1e-12)
        _, tangent = gs.jvp(functools.partial(f, n=np.int32(n)), (x,), (np.ones(2),))
        np.testing.assert_allclose(tangent, 2.0 * 2 ** n, rtol=1e-12)
    with pytest.raises(GraphError, match="reverse-mode"):
        gs.grad(f)(x, np.int32(3))


def test_while_loop_refuses_bad_conditions_and_bodies():
    with pytest.raises(ShapeError, match="condition must return a scalar"):
        gs.trace(lambda x: gs.while_loop(lambda v: v > 0, lambda v: v - 1.0, x), X)
    with pytest.raises(ShapeError, match="body must return"):
        gs.trace(lambda x: gs.while_loop(lambda v: gs.sum(v) > 0, lambda v: v[:2], x), X)
    assert gs.while_loop(lambda v: v < 10, lambda v: v * 3, 1) == 27  # concrete: Python's own loop


# ---------------------------------------------------------------- custom_vjp


@gs.custom_vjp
def clipped_sqrt(x):
    return gs.sqrt(x)


def _clipped_sqrt_fwd(x):
    y = gs.sqrt(x)
    return y, y


def _clipped_sqrt_bwd(y, g):
    return (gs.minimum(g / (2 * y), 10.0),)  # a gradient clipped at 10: not the function's own derivative


clipped_sqrt.defvjp(_clipped_sqrt_fwd, _clipped_sqrt_bwd)


def test_custom_vjp_runs_the_function_and_its_rule():
    x = np.array([1e-4, 0.25, 4.0])
    assert [n.op for n in gs.trace(clipped_sqrt, x).nodes] == ["custom_vjp"]
    np.testing.assert_allclose(clipped_sqrt(x), np.sqrt(x))
    g = gs.grad(lambda a: gs.sum(clipped_sqrt(a) * 3.0))(x)
    np.testing.assert_allclose(g, np.minimum(3.0 / (2 * np.sqrt(x)), 10.0), rtol=1e-12)
    jac = gs.jacobian(lambda a: clipped_sqrt(a) * a)(x)  # stacked seeds: bwd mapped over the Jacobian's rows
    want = np.diag(np.minimum(x / (2 * np.sqrt(x)), 10.0) + np.sqrt(x))
    np.testing.assert_allclose(jac, want, rtol=1e-12)
    with pytest.raises(GraphError, match="forward mode"):
        gs.jvp(lambda a: clipped_sqrt(a), (x,), (x,))


def test_custom_vjp_implicit_function_gradient():
    """x = sqrt(a) by Newton's method, differentiated by the implicit-function theorem (dx/da = 1/(2x))."""
    @gs.custom_vjp
    def newton_sqrt(a):
        return gs.fori_loop(0, 30, lambda i, x: 0.5 * (x + a / x), a)

    def fwd(a):
        x = newton_sqrt(a)
        return x, x

    def bwd(x, g):
        return (g / (2 * x),)

    newton_sqrt.defvjp(fwd, bwd)
    a = np.array([2.0, 9.0, 0.5])
    np.testing.assert_allclose(newton_sqrt(a), np.sqrt(a), rtol=1e-12)
    np.testing.assert_allclose(gs.grad(lambda v: gs.sum(newton_sqrt(v)))(a), 0.5 / np.sqrt(a), rtol=1e-12)
    # the rule, not the loop, was differentiated: no scan in the gradient's backward part
    np.testing.assert_allclose(gs.hessian(lambda v: gs.sum(newton_sqrt(v)))(a), np.diag(-0.25 * a ** -1.5), rtol=1e-10)


def test_custom_vjp_refusals():
    @gs.custom_vjp
    def f(x):
        return x * 2.0

    with pytest.raises(TypeError, match="defvjp"):
        gs.trace(f, X)
    f.defvjp(lambda x: (x * 2.0, None), lambda r, g: (g * 2.0, g))
    with pytest.raises(TypeError, match="one cotangent per argument"):
        gs.grad(lambda x: gs.sum(f(x)))(X)
    w = np.ones(3)

    def closes(x, w):
        @gs.custom_vjp
        def h(y):
            return y * w
        h.defvjp(lambda y: (y * w, None), lambda r, g: (g * w,))
        return gs.sum(h(x))

    with pytest.raises(GraphError, match="closes over a traced value"):
        gs.trace(closes, X, w)


# ---------------------------------------------------------------- checkpoint


def block(h, w):
    return gs.tanh(gs.tanh(gs.tanh(h @ w) @ w) @ w) + h


def deep(ws, x, wrap):
    h = x
    for w in ws:
        h = wrap(block)(h, w)
    return gs.sum(h * h)


def grad_plan_of(f, *args):
    g = gs.trace(f, *args)
    wrt = [i.name for i in g.inputs if i.dtype == "float64"]
    return Engine().grad_plan(g, wrt, g.output_names()[0])


def test_checkpoint_keeps_values_and_gradients_and_lowers_the_peak():
    rng = np.random.default_rng(8)
    ws = [rng.normal(size=(8, 8)) / 3 for _ in range(10)]
    x = rng.normal(size=(256, 8))

    def plain(f):
        return f

    want_v, want_g = gs.value_and_grad(lambda ws: deep(ws, x, plain))(ws)
    got_v, got_g = gs.value_and_grad(lambda ws: deep(ws, x, gs.checkpoint))(ws)
    np.testing.assert_allclose(got_v, want_v, rtol=1e-12)
    for g, w in zip(got_g, want_g, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)
    peak_plain = grad_plan_of(lambda ws, x: deep(ws, x, plain), ws, x).peak_bytes
    peak_ckpt = grad_plan_of(lambda ws, x: deep(ws, x, gs.checkpoint), ws, x).peak_bytes
    assert peak_ckpt <= 0.5 * peak_plain, (peak_ckpt, peak_plain)


def test_a_plans_peak_counts_what_a_subgraph_holds():
    n = 300
    f = gs.checkpoint(lambda v: gs.sum(gs.tanh(v[:, None] * v[None, :])))  # an n x n temporary, inside the node
    g = gs.trace(f, np.ones(n))
    assert [nd.op for nd in g.nodes] == ["switch", "reshape"]  # the packed result, as a scalar
    assert Plan(g).peak_bytes >= n * n * 8
    peak = Engine().grad_plan(g, [g.inputs[0].name], g.output_names()[0]).peak_bytes
    assert peak >= 2 * n * n * 8  # forward and backward temporaries of the segment, recomputed in the backward pass


def test_checkpoint_inside_scan_and_under_jvp():
    def f(w, xs):
        def body(c, x):
            return gs.checkpoint(lambda c, x: gs.tanh(c * w + x) * gs.cos(c))(c, x), gs.sum(c)
        c, ys = gs.scan(body, np.ones(3), xs)
        return gs.sum(c) + gs.sum(ys)

    def ref(w, xs):
        c, total = np.ones(3), 0.0
        for x in xs:
            total += c.sum()
            c = np.tanh(c * w + x) * np.cos(c)
        return c.sum() + total

    np.testing.assert_allclose(f(W, XS), ref(W, XS), rtol=1e-12)
    np.testing.assert_allclose(gs.grad(f)(W, XS), fd_grad(ref, [W, XS], 0), rtol=1e-6, atol=1e-8)
    v = RNG.normal(size=3)
    np.testing.assert_allclose(gs.jvp(lambda w: f(w, XS), (W,), (v,))[1], fd_grad(ref, [W, XS], 0) @ v, rtol=1e-6)


# ---------------------------------------------------------------- vmap


def sq_loss(w, x, y):
    return gs.sum((gs.tanh(x @ w) - y) ** 2)


def ref_sq_loss(w, x, y, lib=np):
    return ((lib.tanh(x @ w) - y) ** 2).sum()


XB, YB = RNG.normal(size=(5, 3)), RNG.normal(size=5)


def test_vmap_of_grad_gives_per_example_gradients_traced_and_eager():
    per_example = gs.vmap(gs.grad(sq_loss), in_axes=(None, 0, 0))
    want = np.stack([fd_grad(ref_sq_loss, [W, x, y], 0) for x, y in zip(XB, YB, strict=True)])
    np.testing.assert_allclose(per_example(W, XB, YB), want, rtol=1e-6, atol=1e-8)  # concrete: a Python loop
    g = gs.trace(per_example, W, XB, YB)
    assert [n.op for n in g.nodes].count("scan") == 1 and len(g.nodes) <= 3  # one node whatever the batch
    traced = gs.grad(lambda w: gs.sum(per_example(w, XB, YB) * per_example(w, XB, YB)))(W)
    w = torch.tensor(W, requires_grad=True)
    total = 0.0
    for x, y in zip(XB, YB, strict=True):  # PyTorch's per-example gradients, one at a time, differentiated again
        (gi,) = torch.autograd.grad(ref_sq_loss(w, torch.tensor(x), torch.tensor(y), torch), w, create_graph=True)
        total = total + (gi * gi).sum()
    np.testing.assert_allclose(traced, torch.autograd.grad(total, w)[0].numpy(), rtol=1e-10)


def test_vmap_axes_nesting_and_jacobian():
    a, b = RNG.normal(size=(2, 4)), RNG.normal(size=(3,))
    outer = gs.vmap(gs.vmap(lambda u, v: u * gs.sum(v), in_axes=(0, None)), in_axes=(1, None), out_axes=1)
    np.testing.assert_allclose(outer(a, b), a * b.sum(), rtol=1e-12)
    np.testing.assert_allclose(gs.jvp(outer, (a, b), (a, np.zeros(3)))[1], a * b.sum(), rtol=1e-12)  # linear in a
    f = gs.vmap(lambda u: (gs.sin(u), gs.sum(u * u)), in_axes=1, out_axes=(1, 0))
    s, q = f(a)
    np.testing.assert_allclose(s, np.sin(a), rtol=1e-12)
    np.testing.assert_allclose(q, (a * a).sum(axis=0), rtol=1e-12)
    jac = gs.jacobian(lambda x: gs.vmap(lambda r: gs.sin(r) * r[0])(x))(a)
    want = np.zeros((2, 4, 2, 4))
    for i in range(2):
        want[i, :, i, :] = np.diag(np.cos(a[i]) * a[i, 0])
        want[i, :, i, 0] += np.sin(a[i])
    np.testing.assert_allclose(jac, want, rtol=1e-12, atol=1e-14)


def test_vmap_refusals():
    with pytest.raises(ValueError, match="different sizes"):
        gs.vmap(lambda u, v: u + v)(np.ones(2), np.ones(3))
    with pytest.raises(ValueError, match="maps no argument"):
        gs.vmap(lambda u: u, in_axes=None)(np.ones(2))
    with pytest.raises(ValueError, match="out of range"):
        gs.vmap(lambda u: u, in_axes=2)(np.ones((2, 2)))
    with pytest.raises(ValueError, match="out_axes None"):
        gs.vmap(lambda u: u, out_axes=None)(np.ones(2))
    with pytest.raises(ValueError, match="scalar leaf"):
        gs.vmap(lambda u: u)(1.0)


# ---------------------------------------------------------------- through the server


def test_control_flow_runs_on_the_server(remote):
    for f, args in ((f_cond, (np.abs(X), np.abs(W))), (f_scan, (X, W, XS)), (f_switch, (X, W, np.int32(1))),
                    (lambda a: gs.sum(clipped_sqrt(a) * 3.0), (np.abs(X) + 0.1,)),
                    (lambda a: gs.sum(gs.checkpoint(block)(a, np.eye(3) * 0.5)), (XS[:, :3],)),
                    (lambda w, x, y: gs.sum(gs.vmap(gs.grad(sq_loss), in_axes=(None, 0, 0))(w, x, y) ** 2), (W, XB, YB)),
                    (lambda a: gs.sum(softplus(a) ** 2), (X,))):
        nums = tuple(k for k, a in enumerate(args) if np.asarray(a).dtype == np.float64)
        want = gs.value_and_grad(f, argnums=nums)(*args)
        got = remote.value_and_grad(f, argnums=nums)(*args)
        np.testing.assert_allclose(got[0], want[0], rtol=1e-12)
        for g, w in zip(got[1], want[1], strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-12)
    x, w, v = np.array([1.0, 2.0]), np.array([1.5, 1.2]), np.array([0.3, -0.2])
    want = gs.jvp(lambda a: f_while(x, a), (w,), (v,))
    np.testing.assert_allclose(remote.jvp(lambda a: f_while(x, a), (w,), (v,)), want, rtol=1e-12)


# ---------------------------------------------------------------- the IR: subgraph attributes


def _nested_graph(c: float = 2.0) -> Graph:
    """A scan whose body holds a switch: subgraphs two deep."""
    def f(x, xs):
        def body(carry, v):
            return gs.cond(gs.sum(carry) > 0, lambda a: a * c + v, lambda a: a - v, carry), gs.sum(carry)
        return gs.scan(body, x, xs)
    return gs.trace(f, X, XS)


def test_subgraphs_round_trip_and_count_in_the_id():
    g = _nested_graph()
    data = g.to_proto().SerializeToString(deterministic=True)
    back = Graph.from_proto(pb.Graph.FromString(data))
    assert back.id == g.id and str(back) == str(g)
    assert back.to_proto().SerializeToString(deterministic=True) == data
    assert _nested_graph(3.0).id != g.id  # a constant two levels down changes the id
    assert _nested_graph().id == g.id


def _scan_node(msg: pb.Graph) -> pb.Node:
    (n,) = [n for n in msg.nodes if n.op == "scan"]
    return n


def test_validation_recurses_into_subgraphs():
    msg = _nested_graph().to_proto()
    inner = _scan_node(msg).attrs["body"].graphs.graphs[0]
    (switch,) = [n for n in inner.nodes if n.op == "switch"]
    switch.attrs["branches"].graphs.graphs[1].nodes[-1].op = "no_such_op"
    with pytest.raises(GraphError, match=r"in subgraph body\[0\].*in subgraph branches\[1\].*unknown op 'no_such_op'"):
        Graph.from_proto(msg)
    msg = _nested_graph().to_proto()
    _scan_node(msg).attrs["length"].i = 5  # the xs have 6 steps
    with pytest.raises(ShapeError, match="no leading axis of length 5"):
        Graph.from_proto(msg)
    msg = _nested_graph().to_proto()
    _scan_node(msg).attrs["body"].graphs.Clear()
    with pytest.raises(GraphError, match="holds no subgraph"):
        Graph.from_proto(msg)


def test_subgraph_nodes_and_constants_count_against_the_limits():
    g = _nested_graph()
    total = len(g.nodes)
    stack = [g]
    while stack:
        for n in stack.pop().nodes:
            for v in n.attrs.values():
                if ir.is_graphs(v):
                    total += sum(len(s.nodes) for s in v)
                    stack.extend(v)
    assert total > len(g.nodes)
    Graph.from_proto(g.to_proto(), limits=Limits(max_nodes=total))
    with pytest.raises(LimitError, match="with those of its subgraphs"):
        Graph.from_proto(g.to_proto(), limits=Limits(max_nodes=total - 1))
    with pytest.raises(LimitError, match="with those of its subgraphs"):
        ir.validate(g, Limits(max_nodes=total - 1))
    own = sum(c.nbytes for c in g.constants)
    with pytest.raises(LimitError, match="constants of the graph and its subgraphs"):
        Graph.from_proto(g.to_proto(), limits=Limits(max_constant_bytes=own))


def test_subgraphs_nest_at_most_max_depth():
    def nest(depth: int) -> Graph:
        b = Builder()
        x = b.input("x", "float64", ())
        y = b.bind("sin", x)
        g = b.build([("y", y)])
        for _ in range(depth):
            b = Builder()
            x = b.input("x", "float64", ())
            i = b.const(np.int32(0))
            g = b.build([("y", b.bind("switch", i, x, branches=(g,), select=(0,)))])
        return g

    ok = nest(ir.MAX_DEPTH)
    Graph.from_proto(ok.to_proto())
    with pytest.raises(LimitError, match="nested more than"):
        Graph.from_proto(nest(ir.MAX_DEPTH + 1).to_proto())
    with pytest.raises(LimitError, match="nested more than"):
        ir.validate(nest(ir.MAX_DEPTH + 1))


def test_packed_results_refuse_bad_selections():
    b = Builder()
    x = b.input("x", "float64", (2,))
    i = b.const(np.int32(0))
    branch = Graph.from_proto(gs.trace(lambda a: (a * 2.0, gs.astype(a, np.int32)), np.ones(2)).to_proto())
    with pytest.raises(ShapeError, match="mix dtypes"):
        b.bind("switch", i, x, branches=(branch,), select=(0, 1))
    with pytest.raises(ShapeError, match="distinct results"):
        b.bind("switch", i, x, branches=(branch,), select=(0, 0))
    with pytest.raises(ShapeError, match="int32 scalar"):
        b.bind("switch", b.const(np.float64(0)), x, branches=(branch,), select=(0,))



def test_readme_ode_example_matches_finite_differences():
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = text.split("<!-- ode-example -->\n```python\n")[1].split("```\n<!-- /ode-example -->")[0]
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    y0 = np.array([1.0, -0.5])
    fd = (scope["final_state"](0.7 + EPS, y0) - scope["final_state"](0.7 - EPS, y0)) / (2 * EPS)
    np.testing.assert_allclose(scope["dy_dk"], fd, rtol=1e-6)
