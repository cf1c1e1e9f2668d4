"""The SDK contract: functional transforms, tracing through numpy, pytrees, caches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gradserve as gs
from gradserve_engine.plan import Plan

rng = np.random.default_rng(0)


def seed_f(x, y):
    return x * y + gs.sin(x)


# ---------------------------------------------------------------- the seed's example


def test_seed_gradients():
    x, y = 2.0, 3.0
    assert gs.grad(seed_f)(x, y) == pytest.approx(y + np.cos(x), abs=1e-15)
    gx, gy = gs.grad(seed_f, argnums=(0, 1))(x, y)
    assert (gx, gy) == (pytest.approx(y + np.cos(x), abs=1e-15), pytest.approx(x, abs=1e-15))
    value, g = gs.value_and_grad(seed_f, argnums=0)(x, y)
    assert value == pytest.approx(x * y + np.sin(x)) and g == pytest.approx(y + np.cos(x))


def test_seed_vjp_jvp_hessian():
    out, vjp_fn = gs.vjp(seed_f, 2.0, 3.0)
    assert out == pytest.approx(6 + np.sin(2.0))
    gx, gy = vjp_fn(2.0)  # the adjoint of z scales both gradients
    assert (gx, gy) == (pytest.approx(2 * (3 + np.cos(2.0))), pytest.approx(4.0))
    out, tangent = gs.jvp(seed_f, (2.0, 3.0), (1.0, 0.0))
    assert tangent == pytest.approx(3 + np.cos(2.0))
    _, tangent = gs.jvp(seed_f, (2.0, 3.0), (0.5, 2.0))
    assert tangent == pytest.approx(0.5 * (3 + np.cos(2.0)) + 2.0 * 2.0)
    assert gs.hessian(seed_f)(2.0, 3.0) == pytest.approx(-np.sin(2.0))
    hxx_hxy, hyx_hyy = gs.hessian(seed_f, argnums=(0, 1))(2.0, 3.0)
    np.testing.assert_allclose([*hxx_hxy, *hyx_hyy], [-np.sin(2.0), 1.0, 1.0, 0.0], atol=1e-15)


def test_trace_prints_named_graph():
    graph = gs.trace(seed_f, 2.0, 3.0)
    text = str(graph)
    assert "x=%0:f64[]" in text and "y=%1:f64[]" in text
    assert "= mul %0 %1" in text and "= sin %0" in text and "(out=%" in text
    assert len(graph.nodes) == 3 and graph.output_names() == ["out"]


def test_results_keep_input_dtype():
    x = np.float32(2.0)
    g = gs.grad(lambda x: x * x + gs.sin(x))(np.asarray(x))
    assert g.dtype == np.float32
    g64 = gs.grad(seed_f)(2.0, 3.0)
    assert np.asarray(g64).dtype == np.float64


# ---------------------------------------------------------------- an MLP against PyTorch


def mlp_loss(params, x, y):
    h = gs.tanh(x @ params["w1"] + params["b1"])
    h = np.tanh(h @ params["w2"] + params["b2"])  # numpy's own function on traced values
    return gs.cross_entropy(h @ params["w3"] + params["b3"], y)


def _mlp_data(dtype):
    shapes = {"w1": (20, 32), "b1": (32,), "w2": (32, 16), "b2": (16,), "w3": (16, 5), "b3": (5,)}
    params = {k: (rng.standard_normal(s) * 0.3).astype(dtype) for k, s in shapes.items()}
    return params, rng.standard_normal((8, 20)).astype(dtype), rng.integers(0, 5, 8)


def _torch_mlp(params, x, y):
    tp = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    h = torch.tanh(torch.tensor(x) @ tp["w1"] + tp["b1"])
    h = torch.tanh(h @ tp["w2"] + tp["b2"])
    loss = torch.nn.functional.cross_entropy(h @ tp["w3"] + tp["b3"], torch.tensor(y))
    grads = torch.autograd.grad(loss, list(tp.values()))
    return loss.item(), {k: g.numpy() for k, g in zip(tp, grads, strict=True)}


@pytest.mark.parametrize(("dtype", "tol"), [(np.float64, 1e-10), (np.float32, 1e-5)])
def test_mlp_matches_pytorch(dtype, tol):
    params, x, y = _mlp_data(dtype)
    value, grads = gs.value_and_grad(mlp_loss)(params, x, y)
    want_value, want = _torch_mlp(params, x, y)
    assert set(grads) == set(params)
    assert value == pytest.approx(want_value, rel=tol)
    for k in params:
        assert grads[k].dtype == dtype and grads[k].shape == params[k].shape
        np.testing.assert_allclose(grads[k], want[k], rtol=tol, atol=tol)


def test_mlp_plan_frees_and_reuses_buffers():
    params, x, y = _mlp_data(np.float64)
    from gradserve_engine.autodiff import vjp_graph
    from gradserve_engine.passes import optimize

    graph = gs.trace(mlp_loss, params, x, y)
    plan = Plan(optimize(vjp_graph(graph, [f"params.{k}" for k in params])))
    freed = {f for step in plan.steps for f in step.frees}
    outputs = {vid for _, vid in plan.outputs}
    intermediates = {n.id for n in plan.graph.nodes} - outputs
    assert intermediates <= freed  # every intermediate is released after its last use
    assert plan.n_reused > 0  # and dead buffers are written over instead of allocating


# ---------------------------------------------------------------- numpy on traced values


def test_numpy_functions_trace():
    x = rng.standard_normal((3, 4))
    w = rng.standard_normal((4, 2))
    g = gs.grad(lambda x: np.sum(np.sin(x), axis=0).sum())(x)
    np.testing.assert_allclose(g, np.cos(x), rtol=1e-14)
    gx, gw = gs.grad(lambda x, w: np.mean(np.exp(x @ w)), argnums=(0, 1))(x, w)
    e = np.exp(x @ w) / 6
    np.testing.assert_allclose(gw, x.T @ e, rtol=1e-12)
    np.testing.assert_allclose(gx, e @ w.T, rtol=1e-12)


@pytest.mark.parametrize("call", [lambda x: np.linalg.eig(x), lambda x: np.copysign(x, 1.0).sum(),
                                  lambda x: np.fft.fft(x).sum()])
def test_uncovered_numpy_function_is_named(call):
    with pytest.raises(TypeError, match=r"numpy\.(linalg\.eig|copysign|fft\.fft) is not supported"):
        gs.grad(call)(np.eye(2))


INDEXERS = [
    lambda x: x[1],
    lambda x: x[-1, 2],
    lambda x: x[1:, ::2],
    lambda x: x[::-1, 3:0:-2],
    lambda x: x[None, ..., 1],
    lambda x: x[..., None][:, 1, 0],
    lambda x: x[[0, 2, 2]],
    lambda x: x[:, [3, -1, 0]],
    lambda x: x[[0, 2], [1, 3]],
    lambda x: x[np.array([[0, 1], [2, 2]])],
]


@pytest.mark.parametrize("index", INDEXERS)
def test_indexing_matches_torch(index):
    x = rng.standard_normal((3, 4))
    w = rng.standard_normal(np.shape(index(x)))
    g = gs.grad(lambda x: (index(x) * w).sum())(x)
    tx = torch.tensor(x, requires_grad=True)
    # torch has no negative steps: gather the flat positions numpy's indexing picks
    picked = torch.tensor(np.ascontiguousarray(index(np.arange(12).reshape(3, 4))))
    (tx.reshape(-1)[picked] * torch.tensor(w)).sum().backward()
    np.testing.assert_allclose(g, tx.grad.numpy(), rtol=1e-14)


def test_index_with_traced_integer_labels():
    logits = rng.standard_normal((5, 3))
    labels = np.array([0, 2, 1, 1, 0])
    g = gs.grad(lambda z, y: -gs.log_softmax(z)[np.arange(5), y].mean())(logits, labels)
    tz = torch.tensor(logits, requires_grad=True)
    torch.nn.functional.cross_entropy(tz, torch.tensor(labels)).backward()
    np.testing.assert_allclose(g, tz.grad.numpy(), rtol=1e-12)


def test_index_errors():
    with pytest.raises(IndexError, match="out of bounds"):
        gs.grad(lambda x: x[5].sum())(np.ones(2))
    with pytest.raises(IndexError, match="boolean"):  # a traced mask: the result's shape depends on the data
        gs.grad(lambda x: x[x > 0].sum())(np.ones(2))
    with pytest.raises(IndexError, match="boolean index did not match"):  # a constant mask of the wrong shape
        gs.grad(lambda x: x[np.array([True, False, True])].sum())(np.ones(2))


# ---------------------------------------------------------------- pytrees and names


def test_pytree_in_pytree_out():
    params = {"a": np.ones(2), "b": [np.full(3, 2.0), 3.0]}
    g = gs.grad(lambda p: (p["a"] ** 2).sum() + (p["b"][0] * p["b"][1]).sum())(params)
    assert set(g) == {"a", "b"} and isinstance(g["b"], list)
    np.testing.assert_allclose(g["a"], 2 * np.ones(2))
    np.testing.assert_allclose(g["b"][0], np.full(3, 3.0))
    assert g["b"][1] == pytest.approx(6.0)


def test_names_follow_parameters():
    graph = gs.trace(lambda params, xs: (params["w1"].sum() + xs[0], xs[1]), {"w1": np.ones(2)}, (1.0, 2.0))
    assert graph.input_names() == ["params.w1", "xs[0]", "xs[1]"]
    assert graph.output_names() == ["out[0]", "out[1]"]


def test_jacobian_of_tuple_outputs_and_multiple_args():
    x, y = rng.standard_normal(3), rng.standard_normal(2)

    def f(x, y):
        return gs.tanh(x) * y.sum(), x[:2] * y

    (jxx, jxy), (j2x, j2y) = gs.jacobian(f, argnums=(0, 1))(x, y)
    assert jxx.shape == (3, 3) and jxy.shape == (3, 2) and j2x.shape == (2, 3) and j2y.shape == (2, 2)
    np.testing.assert_allclose(jxx, np.diag((1 - np.tanh(x) ** 2) * y.sum()), atol=1e-15)
    np.testing.assert_allclose(jxy, np.tanh(x)[:, None] * np.ones((3, 2)), atol=1e-15)
    np.testing.assert_allclose(j2x, np.eye(2, 3) * y[:, None], atol=1e-15)
    np.testing.assert_allclose(j2y, np.diag(x[:2]), atol=1e-15)


def test_jacobian_is_one_batched_pass(monkeypatch):
    runs = []
    original = Plan.run_values
    monkeypatch.setattr(Plan, "run_values", lambda self, values: runs.append(1) or original(self, values))
    a = rng.standard_normal((6, 4))
    jac = gs.jacobian(lambda x: gs.sin(a @ x))(rng.standard_normal(4))
    assert jac.shape == (6, 4)
    assert len(runs) == 1  # six output rows, one execution over the stacked seeds


def test_hessian_and_hvp_match_torch():
    a = rng.standard_normal((4, 4))
    x = rng.standard_normal(4)
    v = rng.standard_normal(4)

    def f(x):
        return gs.sum(gs.tanh(a @ x) ** 2) + gs.logsumexp(x)

    def tf(x):
        return (torch.tanh(torch.tensor(a) @ x) ** 2).sum() + torch.logsumexp(x, 0)

    want = torch.autograd.functional.hessian(tf, torch.tensor(x)).numpy()
    np.testing.assert_allclose(gs.hessian(f)(x), want, rtol=1e-10, atol=1e-12)
    (hv,) = gs.hvp(f, (x,), (v,))
    np.testing.assert_allclose(hv, want @ v, rtol=1e-10, atol=1e-12)


def test_grad_of_grad_nests():
    d3 = gs.grad(gs.grad(gs.grad(lambda x: x**4)))(1.5)
    assert d3 == pytest.approx(24 * 1.5)


# ---------------------------------------------------------------- caches


def test_retrace_only_when_signature_changes():
    gs.clear_cache()

    def cube(x):
        return (x**3).sum()

    g = gs.grad(cube)
    g(np.ones(3))
    before = gs.cache_info()
    g(np.full(3, 2.0))  # same signature: no trace, no compile
    g(np.full(3, 5.0))
    mid = gs.cache_info()
    assert mid.misses == before.misses and mid.hits == before.hits + 2
    g(np.ones(4))  # new shape: retrace
    after = gs.cache_info()
    assert after.misses > mid.misses
    assert any("input signature of" in r and "x: f64[3] -> f64[4]" in r for r in after.reasons)
    assert any(r.startswith("plan miss: new graph") for r in after.reasons)


# ---------------------------------------------------------------- composites against PyTorch

COMPOSITES = [
    (lambda x: gs.mean(x, axis=0), lambda x: x.mean(0)),
    (lambda x: gs.var(x, axis=1), lambda x: x.var(1, unbiased=False)),
    (lambda x: gs.var(x, ddof=1), lambda x: x.var()),
    (lambda x: gs.softmax(x), lambda x: torch.softmax(x, -1)),
    (lambda x: gs.log_softmax(x, axis=0), lambda x: torch.log_softmax(x, 0)),
    (lambda x: gs.logsumexp(x, axis=1), lambda x: torch.logsumexp(x, 1)),
    (lambda x: gs.relu(x), torch.relu),
    (lambda x: gs.sigmoid(x), torch.sigmoid),
    (lambda x: gs.norm(x), torch.linalg.norm),
    (lambda x: gs.mse(x, np.ones((3, 4))), lambda x: torch.nn.functional.mse_loss(x, torch.ones(3, 4, dtype=x.dtype))),
    (lambda x: gs.cross_entropy(x, np.array([0, 3, 1])), lambda x: torch.nn.functional.cross_entropy(x, torch.tensor([0, 3, 1]))),
    (lambda x: gs.cross_entropy(x, np.full((3, 4), 0.25)),
     lambda x: torch.nn.functional.cross_entropy(x, torch.full((3, 4), 0.25, dtype=x.dtype))),
]


@pytest.mark.parametrize(("ours", "theirs"), COMPOSITES)
def test_composites_match_torch(ours, theirs):
    x = rng.standard_normal((3, 4))
    w = rng.standard_normal(np.shape(theirs(torch.tensor(x)).detach().numpy()))
    value, g = gs.value_and_grad(lambda x: (ours(x) * w).sum())(x)
    tx = torch.tensor(x, requires_grad=True)
    tv = (theirs(tx) * torch.tensor(w)).sum()
    tv.backward()
    assert value == pytest.approx(tv.item(), rel=1e-12)
    np.testing.assert_allclose(g, tx.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_logsumexp_of_all_minus_inf_row_is_finite_shift():
    x = np.array([[-np.inf, -np.inf], [0.0, 1.0]])
    out = gs.jvp(lambda x: gs.logsumexp(x, axis=1), (x,), (np.zeros_like(x),))[0]
    np.testing.assert_allclose(out, [-np.inf, np.log(np.e + 1)])


# ---------------------------------------------------------------- the imperative API


def test_backward_accumulates_and_zero_grad():
    x = gs.tensor(2.0, requires_grad=True)
    y = gs.tensor(3.0, requires_grad=True)
    z = x * y + gs.sin(x)
    z.backward(retain_graph=True)  # as in PyTorch, a second backward through z needs the graph kept
    assert x.grad == pytest.approx(3 + np.cos(2.0)) and y.grad == pytest.approx(2.0)
    z.backward()  # .grad accumulates across backward calls, as in PyTorch
    assert x.grad == pytest.approx(2 * (3 + np.cos(2.0)))
    gs.zero_grad(x, y)
    assert x.grad is None and y.grad is None
    (x * x).backward()
    assert x.grad == pytest.approx(4.0)


def test_imperative_matches_torch_on_mlp():
    params, xb, yb = _mlp_data(np.float64)
    tensors = {k: gs.tensor(v, requires_grad=True) for k, v in params.items()}
    loss = mlp_loss(tensors, xb, yb)
    loss.backward()
    want_value, want = _torch_mlp(params, xb, yb)
    assert loss.item() == pytest.approx(want_value, rel=1e-12)
    for k, t in tensors.items():
        np.testing.assert_allclose(t.grad, want[k], rtol=1e-10, atol=1e-12)


def test_no_grad_detach_numpy_item():
    x = gs.tensor([1.0, 2.0, 3.0], requires_grad=True)
    with gs.no_grad():
        y = x * 2
    assert not y.requires_grad and gs.is_grad_enabled()
    assert not x.detach().requires_grad
    np.testing.assert_array_equal(x.numpy(), [1.0, 2.0, 3.0])
    s = (x * x).sum()
    assert s.item() == 14.0
    with pytest.raises(RuntimeError, match="does not require grad"):
        y.sum().backward()
    v = x * x
    with pytest.raises(RuntimeError, match="needs a gradient"):
        v.backward()
    v.backward(np.ones(3))
    np.testing.assert_allclose(x.grad, [2.0, 4.0, 6.0])
    with pytest.raises(TypeError, match="only float tensors"):
        gs.tensor([1, 2], requires_grad=True)


# ---------------------------------------------------------------- bad input


def test_differentiating_an_integer_argument_names_it():
    with pytest.raises(TypeError, match=r"argument 'n' of dtype int64"):
        gs.grad(lambda x, n: x * n, argnums=1)(2.0, 3)


def test_shape_error_names_op_and_place():
    with pytest.raises(gs.ShapeError, match=r"matmul\(f64\[1,2\], f64\[3,1\]\).*test_api.py"):
        gs.grad(lambda x: (x @ np.ones(3)).sum())(np.ones(2))
    with pytest.raises(gs.ShapeError, match=r"add\(f64\[2\], f64\[3\]\): shapes \(2,\) and \(3,\) do not broadcast"):
        gs.grad(lambda x: (x + np.ones(3)).sum())(np.ones(2))


def test_non_scalar_grad_and_control_flow_errors():
    with pytest.raises(TypeError, match="one scalar float output"):
        gs.grad(lambda x: x * 2)(np.ones(2))
    with pytest.raises(TypeError, match="truth value of a traced value"):
        gs.grad(lambda x: x if x > 0 else -x)(1.0)


def test_nan_and_inf_propagate_like_numpy():
    x = np.array([0.0, -1.0, np.nan, np.inf])
    g = gs.grad(lambda x: gs.sqrt(x).sum())(x)
    with np.errstate(all="ignore"):
        want = 0.5 / np.sqrt(x)
    np.testing.assert_array_equal(g, want)
