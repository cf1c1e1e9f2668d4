"""Containers through optree (None, namedtuples, dataclasses, registered nodes) and keyword
arguments with `argnames=` in every transform, locally and through a real server."""

from __future__ import annotations

import collections
import dataclasses

import numpy as np
import pytest

import gradserve as gs

rng = np.random.default_rng(3)
X = np.array([1.0, 2.0, 3.0])
Pair = collections.namedtuple("Pair", "w b")


@dataclasses.dataclass
class Layer:
    w: np.ndarray
    b: np.ndarray
    name: str = "dense"  # static data: kept as it is in the gradient


@dataclasses.dataclass(frozen=True)
class Frozen:
    scale: np.ndarray


class Box:
    """A user container registered with gs.register_pytree_node."""

    def __init__(self, inner, tag):
        self.inner, self.tag = inner, tag

    def __eq__(self, other):
        return isinstance(other, Box) and self.tag == other.tag


gs.register_pytree_node(Box, lambda b: ((b.inner,), b.tag, ("inner",)), lambda tag, children: Box(children[0], tag))


@pytest.fixture(params=["local", "remote"])
def session(request):
    if request.param == "local":
        return gs
    return request.getfixturevalue("remote")



# ---------------------------------------------------------------- flatten / unflatten


def test_flatten_names_and_round_trip():
    tree = {"b": [1.0, None, (np.ones(2), 3)], "a": Pair(np.zeros(1), 2.0), "c": Layer(np.ones(1), np.zeros(1))}
    named, spec = gs.flatten(tree, "params")
    assert [n for n, _ in named] == ["params.b[0]", "params.b[2][0]", "params.b[2][1]", "params.a.w", "params.a.b",
                                     "params.c.w", "params.c.b", "params.c.name"]  # dict order as written
    back = gs.unflatten(spec, [x for _, x in named])
    assert back["b"][1] is None and isinstance(back["b"], list) and isinstance(back["b"][2], tuple)
    assert type(back["a"]) is Pair and type(back["c"]) is Layer and back["c"].name == "dense"
    assert list(back) == ["b", "a", "c"]


def test_registered_node_names_and_round_trip():
    named, spec = gs.flatten(Box({"k": np.ones(2)}, "t"), "box")
    assert [n for n, _ in named] == ["box.inner.k"]
    back = gs.unflatten(spec, [np.zeros(2)])
    assert isinstance(back, Box) and back.tag == "t" and back.inner["k"].shape == (2,)


def test_colliding_leaf_names_are_refused():
    with pytest.raises(ValueError, match=r"both named 'p\.a\.b'"):
        gs.flatten({"a.b": 1.0, "a": {"b": 2.0}}, "p")


def test_cached_call_key_leaves_are_flatten_order():
    """The cached transforms key a call of dicts, lists, tuples, numbers, arrays, strings and None
    without optree: the leaves must come in flatten_call's order, and other calls fall back."""
    from gradserve.api import _call_key, _kwargs
    from gradserve.pytree import flatten_call

    a, b = np.ones(2), np.zeros((2, 3), np.float32)
    calls = [((1.0, 2, True), {}), ((a, [b, 3.0], {"z": a, "a": (None, b)}), {}), ((a,), {"w": b, "c": [1.0, None]}),
             (("relu", a, np.float32(1)), {}), (({1: a, "x": {"y": [a, (b,)]}},), {"k": "s"}), ((), {}), (([],), {})]
    keys = []
    for args, kwargs in calls:
        kwargs = _kwargs(kwargs)
        leaves, key = _call_key(args, kwargs)
        flat = flatten_call(args, kwargs)[0]
        assert len(leaves) == len(flat) and all(x is y for x, y in zip(leaves, flat, strict=True))
        keys.append(key)
    assert len(set(keys)) == len(keys)
    def key(*args: object) -> object:
        plain = _call_key(args, {})
        return plain and plain[1]

    assert key([a, a]) != key([a, b]) and key(1.0) != key(1) and key(a) != key(a[None]) and key(None) != key(())
    for other in (Pair(a, a), Layer(a, a), gs.tensor(a), np.float16(1)):
        assert key(a, [other]) is None


def test_cached_call_converts_tensor_leaves_of_a_flattened_call():
    """A call optree flattens (a namedtuple here) is keyed by dtypes and shapes, which do not tell
    a gs.tensor from a numpy array: the entry compiled from arrays takes tensors as well."""
    g = gs.grad(lambda p, s: (p.w * p.b).sum() * s)
    u, v = np.arange(3.0), np.full(3, 2.0)
    for p in (Pair(u, v), Pair(gs.tensor(u), gs.tensor(v)), Pair(u, gs.tensor(v))):
        grads = g(p, 3.0)
        assert type(grads) is Pair and type(grads.w) is np.ndarray and type(grads.b) is np.ndarray
        np.testing.assert_allclose(grads.w, 3 * v)
        np.testing.assert_allclose(grads.b, 3 * u)


# ---------------------------------------------------------------- containers in transforms


def test_none_is_an_empty_subtree(session):
    params = {"w": X, "b": None}
    g = session.grad(lambda p: (p["w"] ** 2).sum())(params)
    assert g["b"] is None
    np.testing.assert_allclose(g["w"], 2 * X)
    assert session.grad(lambda x, unused: (x**2).sum())(X, None) == pytest.approx(2 * X)


def test_namedtuple_round_trips(session):
    p = Pair(X, 2.0)
    g = session.grad(lambda p, x: (p.w * x).sum() + p.b * 3.0)(p, np.ones(3))
    assert type(g) is Pair
    np.testing.assert_allclose(g.w, np.ones(3))
    assert g.b == pytest.approx(3.0)
    assert session.trace(lambda p: p.w.sum() * p.b, p).input_names() == ["p.w", "p.b"]


def test_dataclasses_round_trip(session):
    layer = Layer(rng.standard_normal((3, 2)), np.zeros(2))
    frozen = Frozen(np.array(2.0))

    def loss(layer, frozen, x):
        return ((x @ layer.w + layer.b) ** 2).sum() * frozen.scale

    gl, gf = session.grad(loss, argnums=(0, 1))(layer, frozen, X)
    assert type(gl) is Layer and type(gf) is Frozen and gl.name == "dense"
    h = X @ layer.w + layer.b
    np.testing.assert_allclose(gl.w, 2 * 2.0 * np.outer(X, h))
    np.testing.assert_allclose(gl.b, 2 * 2.0 * h)
    assert gf.scale == pytest.approx((h**2).sum())
    assert session.trace(loss, layer, frozen, X).input_names() == ["layer.w", "layer.b", "frozen.scale", "x"]


def test_registered_node_in_a_transform(session):
    box = Box({"k": X}, "t")
    g = session.grad(lambda b: (b.inner["k"] ** 3).sum())(box)
    assert isinstance(g, Box) and g.tag == "t"
    np.testing.assert_allclose(g.inner["k"], 3 * X**2)


def test_nested_containers_and_vjp(session):
    tree = {"pairs": [Pair(X, np.ones(3))], "layer": Layer(np.ones((3, 1)), np.zeros(1))}

    def f(t):
        p = t["pairs"][0]
        return {"out": (p.w * p.b).sum() + (X @ t["layer"].w).sum(), "none": None}

    out, vjp_fn = session.vjp(f, tree)
    assert out["none"] is None and out["out"] == pytest.approx(X.sum() * 2)
    (ct,) = vjp_fn({"out": 1.0, "none": None})
    assert type(ct["pairs"][0]) is Pair and type(ct["layer"]) is Layer
    np.testing.assert_allclose(ct["pairs"][0].w, np.ones(3))
    np.testing.assert_allclose(ct["layer"].w[:, 0], X)


# ---------------------------------------------------------------- keyword arguments


def f_kw(x, w, *, scale=1.0):
    return ((x * w) ** 2).sum() * scale


def test_argnames_differentiates_the_keyword_argument(session):
    w = np.array([0.5, -1.0, 2.0])
    gw = session.grad(f_kw, argnames="w")(X, w=w)
    np.testing.assert_allclose(gw, 2 * X**2 * w)
    gw_pos = session.grad(f_kw, argnames="w")(X, w)  # the same parameter passed positionally
    np.testing.assert_allclose(gw_pos, gw)
    gx = session.grad(f_kw)(X, w=w, scale=3.0)  # argnums 0 with keyword arguments around it
    np.testing.assert_allclose(gx, 3.0 * 2 * w**2 * X)
    gx, (gw2, gscale) = session.grad(f_kw, argnums=0, argnames=("w", "scale"))(X, w=w, scale=2.0)
    np.testing.assert_allclose(gx, 2.0 * 2 * w**2 * X)
    np.testing.assert_allclose(gw2, 2.0 * 2 * X**2 * w)
    assert gscale == pytest.approx(((X * w) ** 2).sum())
    value, gw3 = session.value_and_grad(f_kw, argnames="w")(x=X, w=w)
    assert value == pytest.approx(((X * w) ** 2).sum())
    np.testing.assert_allclose(gw3, 2 * X**2 * w)


def test_keyword_pytrees_are_named_by_keyword(session):
    def loss(x, *, params):
        return (x @ params["w"] + params["b"]).sum()

    params = {"w": np.ones((3, 2)), "b": np.zeros(2)}
    assert session.trace(loss, X, params=params).input_names() == ["x", "params.w", "params.b"]
    g = session.grad(loss, argnames="params")(X, params=params)
    np.testing.assert_allclose(g["w"], np.stack([X, X], axis=1))
    np.testing.assert_allclose(g["b"], [1.0, 1.0])


def test_keyword_arguments_in_vjp_jvp_jacobian_hessian(session):
    w = np.array([0.5, -1.0, 2.0])
    out, vjp_fn = session.vjp(f_kw, X, w, scale=2.0)
    assert out == pytest.approx(2.0 * ((X * w) ** 2).sum())
    gx, gw = vjp_fn(1.0)
    np.testing.assert_allclose(gx, 2.0 * 2 * w**2 * X)
    np.testing.assert_allclose(gw, 2.0 * 2 * X**2 * w)
    _, tangent = session.jvp(lambda x, *, w: (x * w).sum(), (X,), (np.ones(3),), w=w)
    assert tangent == pytest.approx(w.sum())
    jac = session.jacobian(lambda x, *, w: x * w, argnames="w")(X, w=w)
    np.testing.assert_allclose(jac, np.diag(X))
    hess = session.hessian(f_kw, argnames="w")(X, w=w, scale=1.0)
    np.testing.assert_allclose(hess, np.diag(2 * X**2))
    (hv,) = session.hvp(lambda x, *, w: ((x * w) ** 2).sum(), (X,), (np.ones(3),), w=w)
    np.testing.assert_allclose(hv, 2 * w**2)


def test_keyword_order_is_no_new_signature():
    g = gs.grad(f_kw, argnames="w")
    w = np.ones(3)
    g(X, w=w, scale=2.0)
    before = gs.cache_info().misses
    g(X, scale=2.0, w=w)
    assert gs.cache_info().misses == before


def test_argnames_errors():
    with pytest.raises(ValueError, match=r"argnames 'v' names no argument of this call"):
        gs.grad(f_kw, argnames="v")(X, w=X)
    with pytest.raises(ValueError, match=r"argnums 1 is out of range for 1 positional arguments"):
        gs.grad(lambda x, *, w: (x * w).sum(), argnums=1)(X, w=X)
    with pytest.raises(TypeError, match=r"argument 'n' of dtype int64.*leave it out of argnames"):
        gs.grad(lambda x, *, n: x * n, argnames="n")(2.0, n=3)
