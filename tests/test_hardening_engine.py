"""One request cannot kill, wedge or bloat the server: the engine's side.

  4. time: transforms and plan building are linear in the outputs and inputs and stop inside
     their loops;

Every limit is tested with a small configured value: nothing here allocates more than a few MiB.
"""

from __future__ import annotations

import itertools

import grpc
import numpy as np
import pytest

from gradserve_engine.engine import Engine
from gradserve_engine.errors import Cancelled
from gradserve_engine.guard import stop_when
from gradserve_engine.ir import Builder, Graph
from gradserve_engine.ops import emit as e

MiB = 1 << 20
RESOURCE_EXHAUSTED, INVALID_ARGUMENT = grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT


def _build(fn, *inputs: tuple[str, str, tuple[int, ...]]) -> Graph:
    """A graph of `fn(*input vars)` -> {name: var} (engine emitters)."""
    b = Builder()
    xs = [b.input(name, dtype, shape) for name, dtype, shape in inputs]
    return b.build(list(fn(*xs).items()))


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
