"""Captured state is never stale: arrays a traced function reads from closures, globals and
defaults are inputs read at every call; captured Python scalars and flags are guards that
retrace. Locally, and through a real server (`python -m gradserve_server`)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import gradserve as gs
import gradserve.api as gs_api

X = np.array([1.0, 2.0, 3.0])

# module state the functions below read (the tests rebind and mutate it)
W = np.ones(3)
SCALE = 1.0
SQUARE = True
PARAMS = {"w": np.ones(3), "b": 0.5}
V = np.full(3, 2.0)


def weighted(x):
    return (W * x).sum() * SCALE


def flagged(x):
    return (x**2).sum() if SQUARE else (x**3).sum()


def uses_params(x):
    return (PARAMS["w"] * x).sum() + PARAMS["b"]


def helper(x):
    return (V * x).sum()


def calls_helper(x):
    return helper(x) * 2.0


def misses():
    return gs.cache_info().misses


@pytest.fixture(autouse=True)
def _restore_globals():
    saved = {k: globals()[k] for k in ("W", "SCALE", "SQUARE", "PARAMS", "V")}
    model_w = MODEL.w.copy()
    copies = {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in saved.items()}
    copies["PARAMS"] = {"w": saved["PARAMS"]["w"].copy(), "b": saved["PARAMS"]["b"]}
    yield
    globals().update(copies)
    MODEL.w = model_w


@pytest.fixture
def traces(monkeypatch):
    """How many times gradserve traced a function (local and remote sessions alike)."""
    count = [0]
    original = gs_api.trace_function

    def counting(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(gs_api, "trace_function", counting)
    return count


# ---------------------------------------------------------------- in-place changes: current answer, no retrace


def test_in_place_change_of_a_captured_global_array(traces):
    global W
    g = gs.grad(weighted)
    np.testing.assert_allclose(g(X), np.ones(3))
    before, n = misses(), traces[0]
    W[:] = 5.0
    np.testing.assert_allclose(g(X), np.full(3, 5.0))
    np.testing.assert_allclose(gs.grad(weighted)(X), np.full(3, 5.0))  # a freshly made grad too
    W[1] = -1.0
    np.testing.assert_allclose(gs.value_and_grad(weighted)(X)[1], [5.0, -1.0, 5.0])
    assert misses() == before and traces[0] == n  # in-place changes never retrace


def test_in_place_change_of_a_captured_closure_array(traces):
    def make():
        a = np.ones(3)

        def f(x):
            return (a * x**2).sum()

        return f, a

    f, a = make()
    g = gs.grad(f)
    np.testing.assert_allclose(g(X), 2 * X)
    before, n = misses(), traces[0]
    a *= 3.0
    np.testing.assert_allclose(g(X), 6 * X)
    assert misses() == before and traces[0] == n


def test_captured_arrays_are_inputs_not_constants():
    graph = gs.trace(weighted, X)
    assert graph.input_names() == ["x", "<global>.W"]
    assert all(c.size == 1 for c in graph.constants)  # only the scalar SCALE
    big = np.ones((200, 200))

    def f(x):
        return (big @ x).sum()

    graph = gs.trace(f, np.ones(200))
    assert graph.input_names() == ["x", "<closure>.big"]
    assert all(c.size < 200 for c in graph.constants)  # the matrix is not baked into the graph


def test_arrays_in_captured_containers_and_helpers(traces):
    g_params, g_helper = gs.grad(uses_params), gs.grad(calls_helper)
    np.testing.assert_allclose(g_params(X), np.ones(3))
    np.testing.assert_allclose(g_helper(X), np.full(3, 4.0))
    assert gs.trace(uses_params, X).input_names() == ["x", "<global>.PARAMS.w"]
    assert gs.trace(calls_helper, X).input_names() == ["x", "<global>.V"]
    n = traces[0]
    PARAMS["w"][:] = 7.0
    V[:] = -1.0
    np.testing.assert_allclose(g_params(X), np.full(3, 7.0))
    np.testing.assert_allclose(g_helper(X), np.full(3, -2.0))
    assert traces[0] == n


def test_captured_default_and_bound_method_state(traces):
    weights = np.ones(3)

    def f(x, w=weights):
        return (w * x).sum()

    @dataclasses.dataclass
    class Model:
        w: np.ndarray

        def loss(self, x):
            return (self.w * x**2).sum()

    model = Model(np.ones(3))
    gf, gm = gs.grad(f), gs.grad(model.loss)
    np.testing.assert_allclose(gf(X), np.ones(3))
    np.testing.assert_allclose(gm(X), 2 * X)
    assert gs.trace(model.loss, X).input_names() == ["x", "<self>.w"]
    n = traces[0]
    weights[:] = 4.0
    model.w[:] = 0.5
    np.testing.assert_allclose(gf(X), np.full(3, 4.0))
    np.testing.assert_allclose(gm(X), X)
    assert traces[0] == n


class PlainModel:
    """No container: its attributes that its methods (or the traced code) name are captured."""

    def __init__(self):
        self.w = np.ones(3)
        self.scale = 1.0
        self.name = "plain"

    def loss(self, x):
        return (self.predict(x) ** 2).sum() * self.scale

    def predict(self, x):
        return self.w * x


MODEL = PlainModel()


def uses_model(x):
    return MODEL.predict(x).sum()


def test_attributes_of_plain_objects_and_modules(traces, tmp_path):
    model = PlainModel()
    g = gs.grad(model.loss)
    np.testing.assert_allclose(g(X), 2 * X)
    assert gs.trace(model.loss, X).input_names() == ["x", "<self>.w"]
    n = traces[0]
    model.w[:] = 3.0  # in place
    np.testing.assert_allclose(g(X), 18 * X)
    model.w = np.full(3, 2.0)  # rebound attribute
    np.testing.assert_allclose(g(X), 8 * X)
    assert traces[0] == n
    model.scale = 2.0  # a guarded scalar attribute
    np.testing.assert_allclose(g(X), 16 * X)
    assert any("attribute 'scale' of self changed 1.0 -> 2.0" in r for r in gs.cache_info().reasons)

    gm = gs.grad(uses_model)  # a global object, through a method it calls
    np.testing.assert_allclose(gm(X), np.ones(3))
    assert gs.trace(uses_model, X).input_names() == ["x", "<global>.MODEL.w"]
    MODEL.w[:] = 4.0
    np.testing.assert_allclose(gm(X), np.full(3, 4.0))

    import types

    config = types.ModuleType("config")  # a module of user code, read by attribute
    config.__file__ = str(tmp_path / "config.py")
    config.W = np.ones(3)

    def reads_module(x):
        return (config.W * x).sum()

    gc = gs.grad(reads_module)
    np.testing.assert_allclose(gc(X), np.ones(3))
    n = traces[0]
    config.W[:] = -1.0
    np.testing.assert_allclose(gc(X), -np.ones(3))
    assert traces[0] == n


def test_nested_transforms_read_the_captured_array(traces):
    def inner(y):
        return (W * y**3).sum()

    def outer(y):
        return gs.grad(inner)(y)

    second = gs.grad(gs.grad(inner))
    assert gs.grad(outer)(2.0) == pytest.approx(6 * 2.0 * 3)
    assert second(2.0) == pytest.approx(6 * 2.0 * 3)
    n = traces[0]
    W[:] = 2.0
    assert gs.grad(outer)(2.0) == pytest.approx(6 * 2.0 * 6)
    assert second(2.0) == pytest.approx(6 * 2.0 * 6)
    assert traces[0] == n


@pytest.mark.parametrize("transform", ["vjp", "jvp", "jacobian", "hessian", "hvp"])
def test_every_transform_reads_current_state(transform):
    def f(x):
        return (W * x**2).sum()

    def run():
        if transform == "vjp":
            return gs.vjp(f, X)[1](1.0)[0]
        if transform == "jvp":
            return gs.jvp(f, (X,), (np.ones(3),))[1]
        if transform == "jacobian":
            return gs.jacobian(f)(X)
        if transform == "hessian":
            return np.diag(gs.hessian(f)(X))
        return gs.hvp(f, (X,), (np.ones(3),))[0]

    want = {"vjp": lambda w: 2 * w * X, "jvp": lambda w: (2 * w * X).sum(), "jacobian": lambda w: 2 * w * X,
            "hessian": lambda w: 2 * w, "hvp": lambda w: 2 * w}[transform]
    np.testing.assert_allclose(run(), want(W))
    W[:] = [3.0, -2.0, 0.5]
    np.testing.assert_allclose(run(), want(W))


# ---------------------------------------------------------------- rebinding: current answer


def test_global_rebinding(traces):
    global W, SCALE
    g = gs.grad(weighted)
    np.testing.assert_allclose(g(X), np.ones(3))
    n = traces[0]
    W = np.full(3, 2.0)  # a new array of the same type: still no retrace
    np.testing.assert_allclose(g(X), np.full(3, 2.0))
    assert traces[0] == n
    SCALE = 10  # a guarded scalar: retraces, and the miss says why
    np.testing.assert_allclose(g(X), np.full(3, 20.0))
    assert traces[0] == n + 1
    assert any("global 'SCALE' changed 1.0 -> 10" in r for r in gs.cache_info().reasons)
    W = np.ones(4)  # a new shape retraces
    np.testing.assert_allclose(g(np.ones(4)), np.full(4, 10.0))
    assert any("global 'W' changed f64[3] -> f64[4]" in r for r in gs.cache_info().reasons)


def test_closure_rebinding(traces):
    def make():
        scale = 1.0
        a = np.ones(3)

        def f(x):
            return (a * x).sum() * scale

        def set_scale(v):
            nonlocal scale
            scale = v

        def set_a(v):
            nonlocal a
            a = v

        return f, set_scale, set_a

    f, set_scale, set_a = make()
    g = gs.grad(f)
    np.testing.assert_allclose(g(X), np.ones(3))
    set_scale(3.0)
    np.testing.assert_allclose(g(X), np.full(3, 3.0))
    assert any("closure 'scale' changed 1.0 -> 3.0" in r for r in gs.cache_info().reasons)
    n = traces[0]
    set_a(np.array([1.0, 2.0, 3.0]))
    np.testing.assert_allclose(g(X), [3.0, 6.0, 9.0])
    assert traces[0] == n


def test_captured_flag(traces):
    global SQUARE
    g = gs.grad(flagged)
    np.testing.assert_allclose(g(X), 2 * X)
    SQUARE = False
    np.testing.assert_allclose(g(X), 3 * X**2)
    assert any("global 'SQUARE' changed True -> False" in r for r in gs.cache_info().reasons)
    n = traces[0]
    SQUARE = True  # back to a value it traced before: a cache hit
    np.testing.assert_allclose(g(X), 2 * X)
    assert traces[0] == n


def test_rebinding_a_called_function(traces):
    def act(x):
        return x**2

    def f(x):
        return act(x).sum()

    g = gs.grad(f)
    np.testing.assert_allclose(g(X), 2 * X)
    act_cubed = lambda x: x**3  # noqa: E731

    def rebind():
        nonlocal act
        act = act_cubed

    rebind()
    np.testing.assert_allclose(g(X), 3 * X**2)


TRACES_SEEN = 0


def counts_its_traces(x):
    global TRACES_SEEN
    TRACES_SEEN += 1
    return (W * x).sum()


def test_assignments_while_tracing_reach_the_originals():
    gs.grad(counts_its_traces)(X)  # traced through a copy of the globals (W is a traced value there)
    assert TRACES_SEEN == 1
    hits = []

    def make():
        a = np.ones(3)
        calls = 0

        def f(x):
            nonlocal calls
            calls += 1
            hits.append(calls)
            return (a * x).sum()

        return f

    gs.grad(make())(X)
    assert hits == [1]
    model = PlainModel()

    def traced_method(x):
        model.name = "traced"
        return model.loss(x)

    gs.grad(traced_method)(X)
    assert model.name == "traced"


# ---------------------------------------------------------------- arrays a trace cannot take: constants, guarded by contents


def test_captured_array_in_python_control_flow_is_a_guarded_constant():
    gate = np.array([1.0])

    def f(x):
        return (x**2).sum() if float(gate[0]) > 0 else (x**3).sum()

    g = gs.grad(f)
    np.testing.assert_allclose(g(X), 2 * X)
    assert any("constants of the graph" in r for r in gs.cache_info().reasons)
    gate[0] = -1.0  # in place: the contents guard retraces
    np.testing.assert_allclose(g(X), 3 * X**2)
    assert any("closure 'gate' changed f64[1]" in r for r in gs.cache_info().reasons)


def test_an_error_of_the_function_keeps_captured_arrays_inputs(traces):
    a = np.ones(3)

    def f(x):
        return (a * x).sum()

    g = gs.grad(f)
    with pytest.raises(gs.ShapeError, match=r"mul\(f64\[3\], f64\[4\]\)"):
        g(np.ones(4))  # the function's own error, as a plain trace reports it
    np.testing.assert_allclose(g(X), np.ones(3))
    n = traces[0]
    a[:] = 2.0
    np.testing.assert_allclose(g(X), np.full(3, 2.0))
    assert traces[0] == n  # still an input: no retrace for the new contents


# ---------------------------------------------------------------- against a real server



def test_remote_calls_send_the_captured_arrays(remote, traces):
    global SCALE
    g = remote.grad(weighted)
    np.testing.assert_allclose(g(X), np.ones(3))
    n = traces[0]
    W[:] = 5.0
    np.testing.assert_allclose(g(X), np.full(3, 5.0))
    np.testing.assert_allclose(remote.value_and_grad(weighted)(X)[1], np.full(3, 5.0))
    np.testing.assert_allclose(remote.jacobian(weighted)(X), np.full(3, 5.0))
    out, vjp_fn = remote.vjp(weighted, X)
    assert out == pytest.approx(5.0 * X.sum())
    np.testing.assert_allclose(vjp_fn(1.0)[0], np.full(3, 5.0))
    vjp_fn.close()
    np.testing.assert_allclose(remote.hessian(lambda x: (W * x**2).sum())(X), np.diag(np.full(3, 10.0)))
    assert traces[0] == n + 1  # the lambda; no retrace for the in-place change
    SCALE = 2.0
    np.testing.assert_allclose(g(X), np.full(3, 10.0))
    assert remote.trace(weighted, X).input_names() == ["x", "<global>.W"]


def test_remote_closure_rebinding_and_flag(remote):
    global SQUARE
    g = remote.grad(flagged)
    np.testing.assert_allclose(g(X), 2 * X)
    SQUARE = False
    np.testing.assert_allclose(g(X), 3 * X**2)

    def make():
        a = np.ones(3)

        def f(x):
            return (a * x).sum()

        def set_a(v):
            nonlocal a
            a = v

        return f, set_a

    f, set_a = make()
    gf = remote.grad(f)
    np.testing.assert_allclose(gf(X), np.ones(3))
    set_a(np.full(3, 4.0))
    np.testing.assert_allclose(gf(X), np.full(3, 4.0))


def test_remote_job_uses_the_captured_values_of_submission(remote):
    target = np.array([1.0, -2.0, 3.0])

    def loss(p):
        return ((p - target) ** 2).sum()

    result = remote.minimize(loss, np.zeros(3), steps=200).wait(timeout=60).result()
    np.testing.assert_allclose(result.x, target, atol=1e-6)
    target[:] = [4.0, 5.0, 6.0]  # a new job sees the new values
    result = remote.minimize(loss, np.zeros(3), steps=200).wait(timeout=60).result()
    np.testing.assert_allclose(result.x, target, atol=1e-6)
