"""Boolean masks and computed indices on traced values: numpy's value, torch's gradient, or an
error; never another number.

The property test draws random numpy indexing expressions (ints, slices with any step, None,
Ellipsis, integer arrays constant, traced or computed in the function, constant boolean masks,
0-d booleans, float arrays, traced masks) and checks each against numpy (the value) and torch
(the gradient of sum(w * x[key]) for random w); where numpy raises, gradserve must raise too.
"""

from __future__ import annotations

import warnings
from collections import Counter
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradserve as gs
from gradserve.numpy_api import DataDependentShapeError
from gradserve_engine.errors import GraphError

rng = np.random.default_rng(12)
FAST_EXAMPLES, FUZZ_EXAMPLES = 2_000, 20_000


def torch_grad(x: np.ndarray, key: Any, w: np.ndarray) -> np.ndarray:
    """torch's gradient of sum(w * x[key]): gather the flat positions numpy's indexing picks
    (torch has no negative steps), so torch's own indexing backward accumulates them."""
    picked = np.arange(x.size).reshape(x.shape)[key]
    tx = torch.tensor(x, requires_grad=True)
    (tx.reshape(-1)[torch.tensor(np.array(picked))] * torch.tensor(w)).sum().backward()
    return tx.grad.numpy()


# ---------------------------------------------------------------- the findings, one test each


X = np.array([[1.0, -2.0, 0.5], [0.3, 2.1, -1.0]])


def test_traced_mask_raises_at_the_users_line_naming_the_fix():
    with pytest.raises(DataDependentShapeError) as info:
        gs.value_and_grad(lambda x: gs.sum(x[x > 0]))(X)  # this line is named in the message
    msg = str(info.value)
    assert f"test_masks.py:{info.tb.tb_lineno}" in msg  # the user's line: the one above
    assert "gs.where" in msg and "gs.sum(x, where=mask)" in msg and "gs.mean(x, where=mask)" in msg
    assert isinstance(info.value, GraphError) and isinstance(info.value, IndexError)


@pytest.mark.parametrize("index", [
    lambda x: x[x > 0, 0], lambda x: x[:, x[0] > 0], lambda x: x[x.sum() > 0], lambda x: x[1:][x[1:] > 0],
])
def test_every_form_of_traced_mask_raises(index):
    with pytest.raises(DataDependentShapeError, match="shape that depends on the data"):
        gs.grad(lambda x: gs.sum(index(x)))(X)


@pytest.mark.parametrize("call", [
    lambda x: np.nonzero(x > 0), lambda x: np.where(x > 0), lambda x: gs.where(x > 0), lambda x: np.argwhere(x),
    lambda x: np.unique(x), lambda x: np.compress(x[0] > 0, x, axis=1), lambda x: x[: gs.sum(x > 0)],
])
def test_other_data_dependent_shapes_raise(call):
    with pytest.raises(DataDependentShapeError, match="depends on the data"):
        gs.grad(lambda x: gs.sum(call(x)))(X)


POS = X[X > 0]


@pytest.mark.parametrize("masked, torch_fn, numpy_value", [
    (lambda x: gs.sum(x, where=x > 0), lambda t: t[t > 0].sum(), POS.sum()),
    (lambda x: gs.mean(x, where=x > 0), lambda t: t[t > 0].mean(), POS.mean()),
    (lambda x: np.sum(x, where=x > 0), lambda t: t[t > 0].sum(), POS.sum()),
    (lambda x: np.mean(x, where=x > 0), lambda t: t[t > 0].mean(), POS.mean()),
    (lambda x: x.sum(where=x > 0), lambda t: t[t > 0].sum(), POS.sum()),
    (lambda x: x.mean(where=x > 0), lambda t: t[t > 0].mean(), POS.mean()),
    (lambda x: gs.sum(gs.where(x > 0, x, 0.0)), lambda t: torch.where(t > 0, t, 0.0).sum(), POS.sum()),
    (lambda x: gs.sum(x * x, where=x > 0), lambda t: (t * t)[t > 0].sum(), (POS * POS).sum()),
])
def test_masked_reductions_give_numpys_value_and_torchs_gradient(masked, torch_fn, numpy_value):
    value, g = gs.value_and_grad(masked)(X)
    assert value == pytest.approx(numpy_value, rel=1e-15)
    tx = torch.tensor(X, requires_grad=True)
    torch_fn(tx).backward()
    np.testing.assert_allclose(g, tx.grad.numpy(), rtol=1e-15)


def test_the_reported_mask_case_now_matches_numpy_and_torch():
    """The finding: sum(x[x > 0]) traced gave another number where numpy gives 2.9, and the
    gradient [[2,2,2],[4,4,4]] where torch gives [[1,0,1],[1,1,0]]. Now x[x > 0] raises (above)
    and its traceable form gives numpy's value and torch's gradient."""
    x = np.array([[1.5, -1.0, 0.6], [0.3, 0.5, -2.0]])
    assert np.sum(x[x > 0]) == pytest.approx(2.9)
    value, g = gs.value_and_grad(lambda x: gs.sum(x, where=x > 0))(x)
    assert value == pytest.approx(2.9, rel=1e-15)
    tx = torch.tensor(x, requires_grad=True)
    tx[tx > 0].sum().backward()
    np.testing.assert_array_equal(g, tx.grad.numpy())
    np.testing.assert_array_equal(g, [[1, 0, 1], [1, 1, 0]])


def test_masked_reduction_along_an_axis_and_broadcast_mask():
    x = rng.standard_normal((3, 4))
    m = np.array([True, False, True, True])
    m2 = np.array([[True, False, True, True], [False, False, True, False], [True, False, False, True]])
    with warnings.catch_warnings():  # column 1 has nothing selected: nan, with numpy's warning
        warnings.simplefilter("ignore", RuntimeWarning)
        for mask in (m, m2):
            for axis in (0, 1, None):
                for keepdims in (False, True):
                    np.testing.assert_allclose(gs.mean(x, axis, keepdims, where=mask),
                                               np.mean(x, axis, keepdims=keepdims, where=mask), rtol=1e-15)
                    np.testing.assert_allclose(gs.sum(x, axis, keepdims, where=mask),
                                               np.sum(x, axis, keepdims=keepdims, where=mask), rtol=1e-15)
    g = gs.grad(lambda x: np.mean(x, axis=1, where=m).sum())(x)
    tx = torch.tensor(x, requires_grad=True)
    tx[:, torch.tensor(m)].mean(1).sum().backward()
    np.testing.assert_allclose(g, tx.grad.numpy(), rtol=1e-15)
    with np.errstate(invalid="ignore"):
        assert np.isnan(gs.mean(x, where=np.zeros((3, 4), bool)))  # nothing selected: nan, as numpy
    with pytest.raises(ValueError, match="does not broadcast"):
        gs.sum(x, where=np.ones((2, 4), bool))
    with pytest.raises(TypeError, match="boolean mask"):
        gs.sum(x, where=np.ones(4, int))


@pytest.mark.parametrize("mask", [
    np.array([[True, False, True], [False, True, True]]), np.array([False, True]), np.array([True, True, False]),
    np.zeros((2, 3), bool),
])
def test_constant_masks_give_numpys_value_and_torchs_gradient(mask):
    key = mask if mask.shape != (3,) else (slice(None), mask)
    want = X[key]
    w = rng.standard_normal(want.shape)
    gx, gw = gs.grad(lambda x, w: gs.sum(w * x[key]), argnums=(0, 1))(X, w)
    np.testing.assert_array_equal(gw, want)
    tx = torch.tensor(X, requires_grad=True)
    (tx[torch.tensor(mask)] if mask.shape != (3,) else tx[:, torch.tensor(mask)]).mul(torch.tensor(w)).sum().backward()
    np.testing.assert_array_equal(gx, tx.grad.numpy())


@pytest.mark.parametrize("index", [
    lambda x: x[x * 0 + 1.7], lambda x: x[np.array([1.7, 0.2])], lambda x: x[1.0], lambda x: x[np.float64(1)],
    lambda x: x[:, (x[0] * 0 + 1).astype("float32")], lambda x: x[[0.0, 1.0]],
])
def test_float_indices_raise_index_error_as_numpy(index):
    with pytest.raises(IndexError):
        index(X)  # numpy itself
    with pytest.raises(IndexError, match=r"integer|valid indices"):
        gs.grad(lambda x: gs.sum(index(x)))(X)


@pytest.mark.parametrize("index, args", [
    (lambda x, i: x[i + 1], (np.array([0, 1, -3, 1]),)),
    (lambda x, i: x[3 - 1 - i], (np.array([0, 1, 1, 2]),)),  # n - 1 - idx
    (lambda x, i: x[:, i - 1], (np.array([[0, 3], [1, 2]]),)),
    (lambda x, i: x[i * 2 - 3, i], (np.array([1, 2, 0]),)),  # negative results wrap as numpy's
    (lambda x, i, j: x[i, j + 0], (np.array([0, 1, -1]), np.array([[2], [-1]]))),
    (lambda x, i: x[..., np.argmax(np.array([1, 5, 2])) * 0 + i], (np.array(1),)),
])
def test_computed_integer_indices_gather_with_torchs_gradient(index, args):
    x = rng.standard_normal((3, 3))
    want = index(x, *args)
    w = rng.standard_normal(np.shape(want))
    gx, gw = gs.grad(lambda x, w, *a: gs.sum(w * index(x, *a)), argnums=(0, 1))(x, w, *args)
    np.testing.assert_array_equal(gw, want)
    key_positions = index(np.arange(9).reshape(3, 3), *args)
    tx = torch.tensor(x, requires_grad=True)
    (tx.reshape(-1)[torch.as_tensor(key_positions)] * torch.tensor(w)).sum().backward()
    np.testing.assert_array_equal(gx, tx.grad.numpy())


@pytest.mark.parametrize("index, i", [
    (lambda x, i: x[i], np.array([0, 2])),  # past the end of a single axis
    (lambda x, i: x[i, 0], np.array([-3])),  # past the start, after the wrap
    (lambda x, i: x[0, i], np.array([3])),  # would land in the next row of the merged axes
    (lambda x, i: x[i + 3, i], np.array([0])),
    (lambda x, i: x[0, i - 5], np.array([1])),  # -4: wraps to -1 unchecked, numpy raises
])
def test_computed_indices_out_of_range_raise(index, i):
    x = rng.standard_normal((2, 3))
    with pytest.raises(IndexError):
        index(x, i)  # numpy itself
    with pytest.raises((IndexError, GraphError), match="out of bounds"):
        gs.grad(lambda x, i: gs.sum(index(x, i)))(x, i)


def test_python_bools_index_as_numpy():
    """x[True] adds an axis (numpy), where an int-subclass check would have read it as x[1]."""
    for key in [True, False, (0, True), (True, [0, 1]), (Ellipsis, True), (np.True_, slice(None), [1, 0])]:
        want = X[key]
        w = rng.standard_normal(want.shape)
        gw = gs.grad(lambda x, w, key=key: gs.sum(w * x[key]), argnums=1)(X, w)
        np.testing.assert_array_equal(gw, want)


# ---------------------------------------------------------------- the property test

SHAPES = [(5,), (4, 3), (3, 4, 2), (2, 3, 1, 2)]
XS = {s: rng.permutation(np.prod(s)).reshape(s).astype(np.float64) + 0.5 for s in SHAPES}  # distinct values


KINDS = ["int", "int", "slice", "slice", "slice", "none", "ellipsis", "intarr", "intarr", "boolarr", "boolarr",
         "bool0", "traced", "computed", "computed", "floatarr", "tracedmask"]


@st.composite
def index_cases(draw: Any) -> tuple[tuple[int, ...], list[tuple], list[np.ndarray]]:
    """(shape, entries, traced arguments); an entry is ("static", obj) or a traced form that the
    function builds from its arguments: ("arg", i), ("plus1", i) (argument + 1), ("rev", i, n)
    (n - 1 - argument); `numpy_value` gives the array each stands for. Hypothesis draws the
    shape and a seed; the seed draws the entries (two draws a case keep hypothesis fast)."""
    shape = draw(st.sampled_from(SHAPES))
    r = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kinds = [KINDS[i] for i in r.integers(len(KINDS), size=r.integers(0, len(shape) + 2))]
    entries: list[tuple] = []
    args: list[np.ndarray] = []
    axis = 0

    def small(d: int, size: Any = None) -> Any:  # in range, and now and then just past either end
        v = r.integers(-d, d, size=size) if d else np.zeros(size, np.int64)
        bad = r.random(size) < 0.04
        return np.where(bad, np.where(r.random(size) < 0.5, -d - 1, d), v)

    for kind in kinds:
        d = shape[axis] if axis < len(shape) else 2
        if kind == "int":
            v = int(small(d))
            entries.append(("static", np.int64(v) if r.random() < 0.3 else v))
            axis += 1
        elif kind == "slice":
            bound = [None if r.random() < 0.3 else int(r.integers(-d - 2, d + 3)) for _ in range(2)]
            step = [None, 1, 2, 3, -1, -2, -3][r.integers(7)] if r.random() > 0.02 else 0
            entries.append(("static", slice(bound[0], bound[1], step)))
            axis += 1
        elif kind == "none":
            entries.append(("static", None))
        elif kind == "ellipsis":
            entries.append(("static", Ellipsis))
            axis = len(shape)  # later entries index from the end: shapes no longer line up (numpy decides)
        elif kind in ("intarr", "traced", "computed"):
            ishape = [(), (1,), (2,), (3,), (2, 1), (1, 3), (2, 2), (0,)][r.integers(8)]
            a = np.asarray(small(d, ishape), dtype=np.int64)
            if kind == "intarr":
                entries.append(("static", a.tolist() if a.ndim and r.random() < 0.3 else a))
            elif kind == "traced":
                entries.append(("arg", len(args)))
                args.append(a)
            elif r.random() < 0.5:
                entries.append(("plus1", len(args)))
                args.append(a - 1)
            else:
                entries.append(("rev", len(args), d))
                args.append(d - 1 - a)
            axis += 1
        elif kind in ("boolarr", "tracedmask"):
            mshape = tuple(shape[axis:axis + int(r.integers(1, 3))]) or (d,)
            if r.random() < 0.05:  # now and then a mask of the wrong shape
                mshape = (mshape[0] + 1, *mshape[1:])
            m = r.random(mshape) < 0.5
            if kind == "boolarr":
                entries.append(("static", m.tolist() if r.random() < 0.3 else m))
            else:
                entries.append(("arg", len(args)))
                args.append(m)
            axis += len(mshape)
        elif kind == "bool0":
            entries.append(("static", [True, False, np.True_, np.False_][r.integers(4)]))
        else:  # floatarr
            f = r.uniform(-d, d, size=(1,))
            if r.random() < 0.5:
                entries.append(("static", f))
            else:
                entries.append(("arg", len(args)))
                args.append(f)
            axis += 1
    return shape, entries, args


def numpy_value(entry: tuple, args: list[np.ndarray]) -> Any:
    kind = entry[0]
    if kind == "static":
        return entry[1]
    a = args[entry[1]]
    return a if kind == "arg" else a + 1 if kind == "plus1" else entry[2] - 1 - a


def traced_value(entry: tuple, traced: tuple) -> Any:
    kind = entry[0]
    if kind == "static":
        return entry[1]
    a = traced[entry[1]]
    return a if kind == "arg" else a + 1 if kind == "plus1" else entry[2] - 1 - a


def check_case(case: tuple, outcomes: Counter) -> None:
    shape, entries, args = case
    x = XS[shape]
    key = tuple(numpy_value(e, args) for e in entries)
    traced_mask = any(e[0] != "static" and args[e[1]].dtype == bool for e in entries)
    try:
        want = x[key]
        numpy_error: Exception | None = None
    except (IndexError, ValueError, TypeError) as e:
        numpy_error = e
    w = rng.standard_normal(np.shape(want)) if numpy_error is None else np.float64(1.0)

    def f(x, w, *traced):
        return gs.sum(w * x[tuple(traced_value(e, traced) for e in entries)])

    try:
        gx, gw = gs.grad(f, argnums=(0, 1))(x, w, *args)
    except (IndexError, GraphError) as e:
        if traced_mask and numpy_error is None:
            assert isinstance(e, DataDependentShapeError), f"a traced mask gave {e!r}, key {key!r}"
            outcomes["traced mask refused"] += 1
            return
        assert numpy_error is not None, f"numpy indexes {key!r} of {shape} but gradserve raised {e!r}"
        outcomes["both raise"] += 1
        return
    except (ValueError, TypeError) as e:  # numpy's type for a zero slice step (numpy may report another fault first)
        assert numpy_error is not None, f"numpy indexes {key!r} of {shape} but gradserve raised {e!r}"
        outcomes["both raise"] += 1
        return
    assert numpy_error is None, f"numpy raises {numpy_error!r} for {key!r} of {shape}; gradserve gave a number"
    assert not traced_mask, f"a traced mask {key!r} gave a number"
    np.testing.assert_array_equal(gw, want, err_msg=f"value of x{list(shape)}[{key!r}]")
    np.testing.assert_allclose(gx, torch_grad(x, key, w), rtol=1e-13, atol=1e-13,
                               err_msg=f"gradient of x{list(shape)}[{key!r}]")
    outcomes["equal to numpy and torch"] += 1
    outcomes.update({f"compared: {feature(e)}" for e in entries})
    if any(np.ndim(k) > 0 for k in key) and any(isinstance(k, slice) or k is None or k is Ellipsis for k in key):
        outcomes["compared: mixed advanced and basic"] += 1


def feature(entry: tuple) -> str:
    kind, v = entry[0], entry[1]
    if kind != "static":
        return "traced integer array" if kind == "arg" else "integer array computed in the function"
    if isinstance(v, slice):
        return "slice with a negative step" if (v.step or 1) < 0 else "slice"
    if v is None or v is Ellipsis:
        return repr(v)
    if isinstance(v, (bool, np.bool_)):
        return "0-d boolean"
    if isinstance(v, (int, np.integer)):
        return "integer"
    return "boolean mask" if np.asarray(v).dtype == bool else "integer array"


def test_random_indexing_matches_numpy_and_torch_or_raises(request):
    n = FUZZ_EXAMPLES if request.config.getoption("--fuzz") else FAST_EXAMPLES
    outcomes: Counter = Counter()

    @settings(max_examples=n, deadline=None, derandomize=True, database=None, print_blob=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(index_cases())
    def campaign(case):
        check_case(case, outcomes)

    campaign()
    assert sum(outcomes.values()) >= n, f"ran {sum(outcomes.values())} cases, fewer than the {n} asked for"
    # most cases compare numbers (the rest check errors): the test is not vacuous
    assert outcomes["equal to numpy and torch"] >= n // 2, outcomes
    assert outcomes["both raise"] >= n // 20 and outcomes["traced mask refused"] >= n // 100, outcomes
    for f in ("integer", "slice", "slice with a negative step", "None", "Ellipsis", "integer array", "boolean mask",
              "0-d boolean", "traced integer array", "integer array computed in the function",
              "mixed advanced and basic"):
        assert outcomes[f"compared: {f}"] >= n // 100, (f, outcomes)
