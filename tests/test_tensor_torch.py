"""Imperative tensors against torch itself: each test runs one snippet twice, with `torch` and
with `gradserve` behind the same small namespace, and compares the values or the errors.
Each test backs one row of the README table "Imperative tensors: torch's rules".
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

import gradserve as gs

TORCH = SimpleNamespace(
    name="torch", no_grad=torch.no_grad, exp=torch.exp, sin=torch.sin, tanh=torch.tanh,
    tensor=lambda d, requires_grad=False, dtype=torch.float64: torch.tensor(d, dtype=dtype, requires_grad=requires_grad),
    int64=torch.int64,
)
GS = SimpleNamespace(
    name="gradserve", no_grad=gs.no_grad, exp=gs.exp, sin=gs.sin, tanh=gs.tanh,
    tensor=lambda d, requires_grad=False, dtype=np.float64: gs.tensor(d, requires_grad=requires_grad, dtype=dtype),
    int64=np.int64,
)


def _plain(v: Any) -> Any:
    if isinstance(v, (torch.Tensor, gs.Tensor)):
        return np.asarray(v.detach().numpy())
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def _run(snippet: Callable[[SimpleNamespace], Any], lib: SimpleNamespace) -> tuple[str, Any]:
    try:
        return "value", _plain(snippet(lib))
    except Exception as e:  # the error itself is what is compared
        return "error", e


def _head(message: str) -> str:
    """torch's message up to its first detail (a tensor description, a hint)."""
    cut = [i for i in (message.find(": ["), message.find(". ")) if i >= 0]
    return message[:min(cut)] if cut else message


def same_as_torch(snippet: Callable[[SimpleNamespace], Any], phrase: str | None = None) -> Any:
    """Run `snippet` with torch and with gradserve: the same values, or the same error type with
    torch's message (its head, or `phrase` where the two name dtypes differently)."""
    kind, want = _run(snippet, TORCH)
    got_kind, got = _run(snippet, GS)
    if kind == "error":
        assert got_kind == "error", f"torch raises {want!r}; gradserve gave {got!r}"
        assert type(got) is type(want), f"torch raises {want!r}; gradserve raised {got!r}"
        assert (phrase or _head(str(want))) in str(got), f"torch: {want}\ngradserve: {got}"
        return got
    assert got_kind == "value", f"torch gives {want!r}; gradserve raised {got!r}"
    assert isinstance(want, dict) and want.keys() == got.keys()
    for k in want:
        if isinstance(want[k], np.ndarray):
            np.testing.assert_allclose(got[k], want[k], rtol=1e-13, atol=1e-15, err_msg=k)
        else:
            assert got[k] == want[k], f"{k}: torch {want[k]!r}, gradserve {got[k]!r}"
    return got


# ---------------------------------------------------------------- one test per README row


def test_update_under_no_grad_keeps_a_leaf():
    def sgd(lib):
        w = lib.tensor([1.0, -2.0, 0.5], requires_grad=True)
        x = lib.tensor([0.3, 0.2, -0.1])
        first = w
        for _ in range(3):
            loss = ((w * x).sum() - 1.0) ** 2
            loss.backward()
            grad = w.grad
            with lib.no_grad():
                w -= 0.1 * w.grad
            assert w.grad is grad  # the update leaves .grad alone
            w.grad.zero_()
        return {"w": w, "same object": w is first, "requires_grad": w.requires_grad, "is_leaf": w.is_leaf,
                "grad": w.grad, "version": w._version}

    got = same_as_torch(sgd)
    assert got["same object"] and got["requires_grad"] and got["is_leaf"] and got["version"] == 3


def test_in_place_operators_on_computed_tensors_are_recorded():
    def chain(lib):
        x = lib.tensor([1.0, 2.0, 3.0], requires_grad=True)
        w = lib.tensor([0.5, -1.0, 2.0], requires_grad=True)
        y = x * 2
        y += w
        y -= 1.5
        y *= w  # the backward needs y's value before this: kept, as torch's original_self
        y /= x
        y **= 2
        (y * lib.tensor([1.0, -2.0, 3.0])).sum().backward()
        return {"y": y, "x.grad": x.grad, "w.grad": w.grad, "is_leaf": y.is_leaf, "version": y._version}

    assert same_as_torch(chain)["version"] == 5


def test_setitem_is_recorded_like_torch():
    def assign(lib):
        x = lib.tensor([1.0, 2.0, 3.0, 4.0, 5.0], requires_grad=True)
        v = lib.tensor(5.0, requires_grad=True)
        y = x * 2
        y[1] = v * 3
        y[3:] = x[:2] * v
        y[y > 9.0] = 0.0  # a mask: its value is known now, so it can index
        y[[0, 2]] = lib.tensor([7.0, 8.0])
        (y * lib.tensor([1.0, 2.0, 3.0, 4.0, 5.0])).sum().backward()
        return {"y": y, "x.grad": x.grad, "v.grad": v.grad}

    same_as_torch(assign)


@pytest.mark.parametrize("change", [
    lambda lib, x: x.__iadd__(1.0), lambda lib, x: x.zero_(), lambda lib, x: x.__setitem__(0, 5.0),
    lambda lib, x: x.mul_(2.0),
])
def test_in_place_on_a_leaf_that_requires_grad_raises(change):
    def snippet(lib):
        x = lib.tensor([1.0, 2.0], requires_grad=True)
        change(lib, x)
        return {"x": x}

    same_as_torch(snippet)


@pytest.mark.parametrize("snippet", [
    lambda lib: _saved_result_changed(lib),
    lambda lib: _saved_operand_changed(lib),
    lambda lib: _saved_leaf_changed_under_no_grad(lib),
], ids=["result saved by exp", "operand saved by mul", "leaf saved by mul, changed under no_grad"])
def test_changing_a_value_saved_for_backward_raises(snippet):
    err = same_as_torch(snippet)
    assert "version 1; expected version 0" in str(err)


def _saved_result_changed(lib):
    x = lib.tensor([1.0, 2.0, 3.0], requires_grad=True)
    y = lib.exp(x)
    y += 1.0
    y.sum().backward()
    return {"x.grad": x.grad}


def _saved_operand_changed(lib):
    x = lib.tensor([1.0, 2.0, 3.0], requires_grad=True)
    w = lib.tensor([0.5, 1.5, -1.0], requires_grad=True)
    y = x * 2
    z = y * w
    y += 1.0
    z.sum().backward()
    return {"x.grad": x.grad}


def _saved_leaf_changed_under_no_grad(lib):
    w = lib.tensor([1.0, 2.0, 3.0], requires_grad=True)
    x = lib.tensor([1.0, 1.0, 2.0], requires_grad=True)
    loss = (w * x).sum()
    with lib.no_grad():
        w -= 0.1
    loss.backward()
    return {"w.grad": w.grad}


def test_changing_a_value_not_saved_for_backward_is_fine():
    def snippet(lib):
        w = lib.tensor([1.0, 2.0, 3.0], requires_grad=True)
        x = lib.tensor([1.0, 1.0, 2.0])
        h = lib.tensor([0.5, 0.5, 0.5], requires_grad=True)
        loss = (w * x).sum() + (h + 1.0).sum()  # mul saves x (not w); add saves nothing
        with lib.no_grad():
            w -= 0.1
            h *= 3.0
        loss.backward()
        return {"w": w, "w.grad": w.grad, "h.grad": h.grad}

    same_as_torch(snippet)


@pytest.mark.parametrize("snippet", [
    lambda lib: _backward_twice(lib, lambda x: x * x, retain=False),
    lambda lib: _backward_twice(lib, lambda x: lib.sin(x) * 2.0, retain=False),
    lambda lib: _backward_twice(lib, lambda x: x * x, retain=True),
    lambda lib: _backward_twice(lib, lambda x: (x + 1.0).sum() + x[1], retain=False),  # nothing saved
    lambda lib: _reuse_freed(lib),
], ids=["mul", "sin", "retain_graph=True", "nothing saved", "a freed part reused"])
def test_second_backward_raises_unless_retain_graph(snippet):
    same_as_torch(snippet)


def _backward_twice(lib, f, retain):
    x = lib.tensor([1.0, 2.0, 3.0], requires_grad=True)
    z = f(x).sum()
    z.backward(retain_graph=retain)
    z.backward()
    return {"x.grad": x.grad}


def _reuse_freed(lib):
    x = lib.tensor([1.0, 2.0, 3.0], requires_grad=True)
    y = x * x
    y.sum().backward()
    (y * 2.0).sum().backward()  # y's multiply was freed by the first backward
    return {"x.grad": x.grad}


def test_grad_accumulates_until_zeroed():
    def snippet(lib):
        x = lib.tensor([1.0, 2.0, 3.0], requires_grad=True)
        (x * x).sum().backward()
        g = x.grad
        (x * x).sum().backward()
        after_two = x.grad.detach().numpy().copy()
        same = g is x.grad  # accumulated into the same tensor
        x.grad.zero_()
        (x * 3.0).sum().backward()
        after_zero = x.grad.detach().numpy().copy()
        x.grad = None
        (x ** 3).sum().backward()
        return {"after two": after_two, "same tensor": same, "after zero_": after_zero, "after None": x.grad,
                "g (the zeroed tensor, accumulated)": g}

    assert same_as_torch(snippet)["same tensor"]


def test_detach_shares_data_and_version():
    def snippet(lib):
        x = lib.tensor([1.0, 2.0], requires_grad=True)
        d = x.detach()
        d += 1.0
        versions = (x._version, d._version)
        y = lib.sin(x)
        x.detach().zero_()  # changes x, which sin saved
        out = {"x": x, "d": d, "x version": versions[0], "d version": versions[1], "requires_grad": d.requires_grad}
        try:
            y.sum().backward()
        except RuntimeError as e:
            out["error"] = _head(str(e))
        return out

    got = same_as_torch(snippet)
    assert got["x version"] == 1 and "modified by an inplace operation" in got["error"]


def test_requires_grad_():
    def snippet(lib):
        x = lib.tensor([1.0, 2.0])
        before = x.requires_grad
        x.requires_grad_()
        y = x * 2
        y.sum().backward()
        x.requires_grad_(False)
        out = {"before": before, "x.grad": x.grad, "after": x.requires_grad, "y leaf": y.is_leaf}
        try:
            y.requires_grad_(False)
        except RuntimeError as e:
            out["non-leaf"] = _head(str(e))
        return out

    assert "leaf variables" in same_as_torch(snippet)["non-leaf"]


@pytest.mark.parametrize("snippet, phrase", [
    (lambda lib: {"x": _iadd(lib.tensor([1, 2], dtype=lib.int64), 1.5)}, "can't be cast to the desired output type"),
    (lambda lib: {"x": _iadd(lib.tensor([1.0, 2.0]), lib.tensor([[1.0, 2.0], [3.0, 4.0]]))}, None),
    (lambda lib: {"x": _iadd(lib.tensor([1.0, 2.0]), lib.tensor([3, 4], dtype=lib.int64))}, None),
    (lambda lib: {"x": _iadd(lib.tensor([[1.0, 2.0], [3.0, 4.0]]), lib.tensor([10.0, 20.0]))}, None),
], ids=["int += float raises", "broadcast result raises", "float += int", "broadcast operand"])
def test_in_place_dtype_and_shape_rules(snippet, phrase):
    same_as_torch(snippet, phrase)


def _iadd(x, o):
    x += o
    return x


def test_version_counter_counts_in_place_operations():
    def snippet(lib):
        x = lib.tensor([1.0, 2.0, 3.0])
        seen = [x._version]
        x += 1.0
        seen.append(x._version)
        x[0] = 5.0
        seen.append(x._version)
        x.zero_()
        seen.append(x._version)
        y = x * 2  # a new tensor starts at 0
        return {"seen": np.array(seen), "y": y._version}

    same_as_torch(snippet)


def test_in_place_under_no_grad_on_a_computed_tensor_keeps_its_history():
    def snippet(lib):
        x = lib.tensor([1.0, 2.0, 3.0], requires_grad=True)
        y = x * 2
        with lib.no_grad():
            y += 1.0
        y.sum().backward()
        return {"y": y, "x.grad": x.grad, "has history": y.grad_fn is not None, "leaf": y.is_leaf}

    same_as_torch(snippet)


def test_in_place_with_an_operand_that_requires_grad_records():
    def snippet(lib):
        t = lib.tensor([1.0, 2.0, 3.0])
        w = lib.tensor([0.5, 0.5, 2.0], requires_grad=True)
        t += w * w
        t.sum().backward()
        return {"t": t, "requires_grad": t.requires_grad, "leaf": t.is_leaf, "w.grad": w.grad}

    same_as_torch(snippet)


def test_backward_of_a_non_scalar_needs_a_gradient():
    def snippet(lib):
        x = lib.tensor([1.0, 2.0], requires_grad=True)
        (x * x).backward()
        return {"x.grad": x.grad}

    same_as_torch(snippet, phrase="grad can be implicitly created only for scalar outputs")


@pytest.mark.parametrize("snippet, phrase", [
    (lambda lib: _masked(lib, lambda x: x[x > 0]), None),
    (lambda lib: _masked(lib, lambda x: x[:, x[0] > 0] * x[1, [2, 0]]), None),
    (lambda lib: _masked(lib, lambda x: x[lib.tensor([1.0, 0.0])]), "indices must be"),
], ids=["mask", "mask and integer list", "float index raises"])
def test_masks_index_tensors(snippet, phrase):
    same_as_torch(snippet, phrase)


def _masked(lib, index):
    x = lib.tensor([[1.5, -1.0, 0.6], [0.3, 0.5, -2.0]], requires_grad=True)
    y = index(x)
    (y * y).sum().backward()
    return {"y": y, "x.grad": x.grad}


def test_recorded_values_cannot_be_written_behind_the_tape():
    """Not a torch comparison: torch's .numpy() shares writable memory; here the array is the
    value the tape recorded, so it is read-only and changes go through in-place operations."""
    x = gs.tensor([1.0, 2.0], requires_grad=True)
    y = x * x
    with pytest.raises(ValueError, match="read-only"):
        y.numpy()[0] = 10.0
    y += 1.0
    y.sum().backward()
    np.testing.assert_array_equal(y.numpy(), [2.0, 5.0])
    np.testing.assert_array_equal(x.grad.numpy(), [2.0, 4.0])
