"""Names never alias: the names transforms add live in their own namespace (they begin with %,
which graphs from outside may not use), so any user name — one that looks like an internal name
(`seeds`, `grad:x`, `ct:out`, `tan:a`, `jac:a:b`, names with ':') — gets the same answer as a
plain one, locally and over every RPC."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradserve as gs
from gradserve.remote import _RemoteBackend
from gradserve_engine.engine import Engine
from gradserve_engine.errors import GraphError
from gradserve_engine.ir import Builder, Graph

# names a user may choose that resemble what the transforms add, and plain ones
LOOKALIKES = ["x", "y", "out", "seeds", "grad:x", "grad:y", "ct:out", "ct:a", "tan:a", "tan:x", "a", "jac:a:x",
              "jac:a", "a:b", "b:c", "a:b:c", "grad:", "tan:", "ct:", "jac:", "0", "1", "x.y", "xs[0]"]


def _graph(inputs: tuple[str, str], outputs: tuple[str, str]) -> Graph:
    """out0 = sum(x0 * x1 + sin(x0)) (a scalar) and out1 = x0 ** 2 * x1 (a vector)."""
    b = Builder()
    x0, x1 = (b.input(n, "float64", (3,)) for n in inputs)
    prod = b.bind("mul", x0, x1)
    s = b.bind("reduce_sum", b.bind("add", prod, b.bind("sin", x0)), axes=(0,), keepdims=False)
    v = b.bind("mul", b.bind("mul", x0, x0), x1)
    return b.build([(outputs[0], s), (outputs[1], v)])


X0, X1 = np.array([0.5, -1.0, 2.0]), np.array([1.5, 0.25, -0.75])
T0, T1 = np.array([1.0, 0.0, -1.0]), np.array([0.5, 2.0, 1.0])


def _answers(backend, inputs: tuple[str, str], outputs: tuple[str, str]) -> dict:
    """Every transform's results for the graph with these names, keyed by position (not name)."""
    g = _graph(inputs, outputs)
    feed = {inputs[0]: X0, inputs[1]: X1}
    res = {"evaluate": [backend.evaluate(g, feed)[o] for o in outputs]}
    outs, grads = backend.vjp(g, feed, list(inputs), seeds={outputs[1]: np.ones(3)})
    res["vjp"] = [outs[outputs[0]], outs[outputs[1]], grads[inputs[0]], grads[inputs[1]]]
    outs, tans = backend.jvp(g, feed, {inputs[0]: T0, inputs[1]: T1})
    res["jvp"] = [outs[o] for o in outputs] + [tans[o] for o in outputs]
    jac = backend.jacobian(g, feed, list(inputs), list(outputs))
    res["jacobian"] = [jac[(o, x)] for o in outputs for x in inputs]
    hess = backend.hessian(g, feed, list(inputs), outputs[0])
    res["hessian"] = [hess[(a, c)] for a in inputs for c in inputs]
    res["hvp"] = list(backend.hvp(g, feed, list(inputs), outputs[0], {inputs[0]: T0, inputs[1]: T1}).values())
    return res


PLAIN = _answers(Engine(), ("p", "q"), ("r", "s"))
distinct_pairs = st.lists(st.sampled_from(LOOKALIKES), min_size=2, max_size=2, unique=True).map(tuple)


def _same(got: dict, want: dict = PLAIN) -> None:
    for kind in want:
        assert len(got[kind]) == len(want[kind])
        for k, (a, b) in enumerate(zip(got[kind], want[kind], strict=True)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-13, atol=1e-14, err_msg=f"{kind}[{k}]")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(inputs=distinct_pairs, outputs=distinct_pairs)
def test_every_transform_gives_the_same_answer_whatever_the_names(inputs, outputs):
    _same(_answers(Engine(), inputs, outputs))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(inputs=distinct_pairs, outputs=distinct_pairs)
def test_every_rpc_gives_the_local_answer_whatever_the_names(remote, inputs, outputs):
    _same(_answers(_RemoteBackend(remote), inputs, outputs))


def test_sdk_parameters_named_like_internal_inputs():
    """gs.jacobian(lambda seeds: seeds*seeds) and a Hessian of a parameter named seeds."""
    x = np.array([3.0, 5.0])
    np.testing.assert_allclose(gs.jacobian(lambda seeds: seeds * seeds)(x), np.diag(2 * x))
    np.testing.assert_allclose(gs.hessian(lambda seeds: gs.sum(seeds ** 3))(x), np.diag(6 * x))


@pytest.mark.parametrize("where", ["input", "output"])
def test_names_beginning_with_the_internal_prefix_are_refused(where):
    g = _graph(("%2", "q") if where == "input" else ("p", "q"), ("r", "%grad:p") if where == "output" else ("r", "s"))
    with pytest.raises(GraphError, match="reserved"):
        Graph.from_proto(g.to_proto())


def test_reserved_names_are_refused_over_the_wire(remote):
    """An input named %2 once aliased a residual value in a residual session (a wrong number)."""
    with pytest.raises(gs.RemoteError) as e:
        remote.register(_graph(("%2", "q"), ("r", "s")))
    assert e.value.code.name == "INVALID_ARGUMENT" and "%2" in str(e.value)


@pytest.mark.parametrize("call", ["vjp", "jacobian", "hessian"])
def test_wrt_naming_an_input_twice_is_refused(call):
    g, feed = _graph(("p", "q"), ("r", "s")), {"p": X0, "q": X1}
    eng = Engine()
    with pytest.raises(GraphError, match=r"\['p'\] more than once"):
        if call == "vjp":
            eng.vjp(g, feed, ["p", "p"], seeds={"s": np.ones(3)})
        elif call == "jacobian":
            eng.jacobian(g, feed, ["p", "p"])
        else:
            eng.hessian(g, feed, ["p", "p"], "r")


def test_wrt_twice_over_the_wire_is_invalid_argument(remote):
    g = _graph(("p", "q"), ("r", "s"))
    with pytest.raises(gs.RemoteError) as e:
        remote.gradient(g, {"p": X0, "q": X1}, wrt=["p", "p"], seeds={"s": np.ones(3)})
    assert e.value.code.name == "INVALID_ARGUMENT" and "more than once" in str(e.value)


def test_outputs_named_twice_are_refused():
    g, feed = _graph(("p", "q"), ("r", "s")), {"p": X0, "q": X1}
    with pytest.raises(GraphError, match="more than once"):
        Engine().evaluate(g, feed, ["r", "r"])
