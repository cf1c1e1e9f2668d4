"""Control flow, custom derivative rules, rematerialisation and mapping, with JAX's signatures:
`cond`, `switch`, `scan`, `fori_loop`, `while_loop`, `custom_vjp`, `custom_jvp`, `checkpoint`, `vmap`.

Each traces the user's functions into subgraphs once and binds one higher-order primitive
(`gradserve_engine.ops.control`), so the loop or the rule travels in the graph and the server
runs it without any Python: a 1,000-step scan is one node. Values a function closes over
(traced values of an enclosing trace) become extra inputs of its subgraph, as JAX's closure
conversion does. When nothing involved is traced (concrete operands, no traced value closed
over), the Python functions simply run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import numpy as np
import optree

from gradserve_engine.errors import GraphError, ShapeError
from gradserve_engine.ir import Builder, Graph, Var, replay, type_str
from gradserve_engine.ops.control import call, call_graph, out_avals
from gradserve_engine.ops.core import FLOATS

from .numpy_api import Traced, astype, dtype_of, shape_of, transpose
from .pytree import tree_flatten, unflatten

# the subtraces open now, innermost last: a function traced inside another's body nests in it
_STACK: ContextVar[tuple[_Sub, ...]] = ContextVar("gradserve_control_traces", default=())


class _Sub(Builder):
    """The trace of one function inside another trace: a value of an enclosing trace that it
    uses becomes one of its inputs (`captured` holds the enclosing values, in input order)."""

    def __init__(self) -> None:
        super().__init__(Traced)
        stack = _STACK.get()
        self.parent: Builder | None = stack[-1] if stack else None  # None: the first value it closes over says
        self.depth = stack[-1].depth + 1 if stack else 1
        self.captured: list[Var] = []
        self._lifted: dict[tuple[int, int], Var] = {}

    def lift(self, v: Var) -> Var:
        if v.builder is self:
            return v
        key = (id(v.builder), v.id)
        got = self._lifted.get(key)
        if got is not None:
            return got
        if isinstance(self.parent, _Sub):
            outer = self.parent.lift(v)
        else:
            if self.parent is None and not isinstance(v.builder, _Sub):
                self.parent = v.builder
            if v.builder is not self.parent:
                raise GraphError(f"{v!r} belongs to another trace (a traced value leaked out of its function?)")
            outer = v
        inner = self.input(f"%capture{len(self.captured)}", v.ir_dtype, v.shape)
        self.captured.append(outer)
        self._lifted[key] = inner
        return inner

    def bind(self, op: str, *args: Var, **attrs: Any) -> Var:
        return super().bind(op, *(self.lift(a) if isinstance(a, Var) else a for a in args), **attrs)


@dataclass
class _Traced:
    graph: Graph
    out_tree: Any  # the structure of what the function returned
    n_args: int
    captured: list[Var]
    parent: Builder | None


def _aval(x: Any) -> tuple[str, tuple[int, ...]]:
    return dtype_of(x), tuple(shape_of(x))


def _trace(fun: Callable[..., Any], avals: Sequence[tuple[str, tuple[int, ...]]], make_args: Callable[[list[Var]], tuple],
           what: str) -> _Traced:
    """Trace `fun(*make_args(inputs))` into a subgraph over inputs of the given types."""
    sub = _Sub()
    token = _STACK.set((*_STACK.get(), sub))
    try:
        ins = [sub.input(f"%arg{k}", d, s) for k, (d, s) in enumerate(avals)]
        out = fun(*make_args(ins))
        leaves, tree = tree_flatten(out)
        outs = []
        for k, v in enumerate(leaves):
            if isinstance(v, Var):
                outs.append(sub.lift(v))
            elif isinstance(v, (bool, int, float, np.ndarray, np.generic)):
                outs.append(sub.const(np.asarray(v)))
            else:
                raise TypeError(f"{what} returned {type(v).__name__} {v!r} at leaf {k}; it must return arrays")
    finally:
        _STACK.reset(token)
    if not outs:
        raise TypeError(f"{what} returned no arrays")
    graph = sub.build([(f"%out{k}", v) for k, v in enumerate(outs)])
    return _Traced(graph, tree, len(avals), sub.captured, sub.parent)


def _key(v: Var) -> tuple[int, int]:
    return (id(v.builder), v.id)


def _widen(t: _Traced, captured: Sequence[Var]) -> Graph:
    """`t.graph` over its arguments and every value in `captured` (those it does not use unread)."""
    if [_key(v) for v in t.captured] == [_key(v) for v in captured]:
        return t.graph
    b = Builder()
    g = t.graph
    env = {i.id: b.input(i.name, i.dtype, i.shape) for i in g.inputs[:t.n_args]}
    position = {_key(v): t.n_args + k for k, v in enumerate(t.captured)}
    for k, v in enumerate(captured):
        x = b.input(f"%capture{k}", v.ir_dtype, v.shape)
        if _key(v) in position:
            env[position[_key(v)]] = x
    replay(g, b, env)
    return b.build([(name, env[vid]) for name, vid in g.outputs])


def _union(traces: Sequence[_Traced]) -> list[Var]:
    seen: dict[tuple[int, int], Var] = {}
    for t in traces:
        for v in t.captured:
            seen.setdefault(_key(v), v)
    return list(seen.values())


def _target(values: Sequence[Any], traces: Sequence[_Traced]) -> Builder | None:
    """The trace the node goes into: the innermost open one, or the trace of the traced values
    involved; None when nothing is traced."""
    stack = _STACK.get()
    if stack:
        return stack[-1]
    builders = {id(v.builder): v.builder for v in values if isinstance(v, Var)}
    builders.update({id(t.parent): t.parent for t in traces if t.parent is not None})
    if len(builders) > 1:
        raise GraphError("values of different traces meet in one control-flow call (a traced value leaked out of "
                         "its function?)")
    return next(iter(builders.values()), None)


def _operands(b: Builder, values: Sequence[Any]) -> list[Var]:
    out = []
    for v in values:
        if isinstance(v, Var):
            out.append(b.lift(v) if isinstance(b, _Sub) else v)
        else:
            out.append(b.const(np.asarray(v)))
    return out


def _types(avals: Sequence[tuple[str, tuple[int, ...]]]) -> str:
    return "(" + ", ".join(type_str(d, s) for d, s in avals) + ")"


# ---------------------------------------------------------------- cond and switch


def switch(index: Any, branches: Sequence[Callable[..., Any]], *operands: Any) -> Any:
    """`branches[clip(index, 0, len(branches) - 1)](*operands)`, as `jax.lax.switch`: every
    branch is traced, only the chosen one runs; gradients flow through the chosen branch."""
    branches = list(branches)
    if not branches or not all(callable(f) for f in branches):
        raise TypeError("switch needs a non-empty sequence of callables as branches")
    if tuple(shape_of(index)) != ():
        raise ShapeError(f"switch index must be a scalar, got shape {tuple(shape_of(index))}")
    if not isinstance(index, Var):  # concrete: Python chooses, and only that branch is traced or run
        return branches[int(np.clip(int(index), 0, len(branches) - 1))](*operands)
    leaves, tree = tree_flatten(operands)
    avals = [_aval(x) for x in leaves]
    traces = [_trace(f, avals, lambda ins: unflatten(tree, ins), f"branch {k} of switch")
              for k, f in enumerate(branches)]
    for k, t in enumerate(traces[1:], 1):
        if t.out_tree != traces[0].out_tree or out_avals(t.graph) != out_avals(traces[0].graph):
            raise ShapeError(f"switch branches must return the same structure and types: branch 0 returns "
                             f"{_types(out_avals(traces[0].graph))}, branch {k} returns {_types(out_avals(t.graph))}")
    captured = _union(traces)
    b = _target([index, *leaves], traces)
    if b is None:
        raise AssertionError("switch on a traced index found no trace")
    ops = _operands(b, [astype(index, "int32"), *leaves, *captured])
    results = call("switch", ops, out_avals(traces[0].graph), branches=tuple(_widen(t, captured) for t in traces))
    return unflatten(traces[0].out_tree, results)


def cond(pred: Any, true_fun: Callable[..., Any], false_fun: Callable[..., Any], *operands: Any) -> Any:
    """`true_fun(*operands)` if `pred` else `false_fun(*operands)`, as `jax.lax.cond`; `pred`
    is a scalar (bool, or a number compared with zero)."""
    if tuple(shape_of(pred)) != ():
        raise ShapeError(f"cond predicate must be a scalar, got shape {tuple(shape_of(pred))}")
    index = astype(pred if pred.ir_dtype == "bool" else pred != 0, "int32") if isinstance(pred, Var) else np.int32(bool(pred))
    return switch(index, [false_fun, true_fun], *operands)


# ---------------------------------------------------------------- scan and fori_loop


def scan(f: Callable[[Any, Any], tuple[Any, Any]], init: Any, xs: Any = None, length: int | None = None,
         reverse: bool = False) -> tuple[Any, Any]:
    """`jax.lax.scan`: `f(carry, x) -> (carry, y)` over the leading axis of `xs`; returns the
    final carry and the ys stacked. One node however many steps; reverse mode keeps one carry
    per step."""
    carry_leaves, carry_tree = tree_flatten(init)
    x_leaves, x_tree = tree_flatten(xs)
    lengths = {int(shape_of(x)[0]) if shape_of(x) else -1 for x in x_leaves}
    if -1 in lengths:
        raise ShapeError("scan: every leaf of xs needs a leading axis to scan over")
    if length is not None:
        lengths.add(int(length))
    if len(lengths) != 1:
        raise ShapeError(f"scan: the leading axes of xs and length disagree: {sorted(lengths)}" if lengths
                         else "scan needs xs or length")
    n = lengths.pop()
    if n < 0:
        raise ShapeError(f"scan length must be non-negative, got {n}")
    c_avals = [_aval(c) for c in carry_leaves]
    x_avals = [(dtype_of(x), tuple(shape_of(x))[1:]) for x in x_leaves]
    nc = len(c_avals)

    def args(ins: list[Var]) -> tuple:
        return unflatten(carry_tree, ins[:nc]), unflatten(x_tree, ins[nc:])

    t = _trace(f, c_avals + x_avals, args, "the scan body")
    tree = t.out_tree
    outs = out_avals(t.graph)
    if tree.num_children != 2 or tree.kind != optree.PyTreeKind.TUPLE:
        raise TypeError("the scan body must return a pair (carry, y)")
    new_carry, y_tree = tree.children()
    if new_carry != carry_tree or outs[:nc] != c_avals:
        raise ShapeError(f"the scan body's carry output {_types(outs[:new_carry.num_leaves])} must have the "
                         f"structure and types of its carry input {_types(c_avals)}")
    b = _target([*carry_leaves, *x_leaves], [t])
    if b is None:
        return _scan_eagerly(f, init, xs, n, reverse)
    ops = _operands(b, [*carry_leaves, *x_leaves, *t.captured])
    results = call("scan", ops, [*outs[:nc], *((d, (n, *s)) for d, s in outs[nc:])], body=(t.graph,),
                   n_carry=nc, n_xs=len(x_leaves), length=n, reverse=bool(reverse))
    return unflatten(carry_tree, results[:nc]), unflatten(y_tree, results[nc:])


def _scan_eagerly(f: Callable[[Any, Any], tuple[Any, Any]], init: Any, xs: Any, n: int, reverse: bool) -> tuple[Any, Any]:
    carry, ys = init, []
    for t in reversed(range(n)) if reverse else range(n):
        carry, y = f(carry, optree.tree_map(lambda x, t=t: x[t], xs, none_is_leaf=False))
        ys.append(y)
    if reverse:
        ys.reverse()
    if not ys:
        return carry, None
    y_leaves, y_tree = tree_flatten(ys[0])
    stacked = [np.stack([np.asarray(tree_flatten(y)[0][k]) for y in ys]) for k in range(len(y_leaves))]
    return carry, unflatten(y_tree, stacked)


def fori_loop(lower: Any, upper: Any, body_fun: Callable[[Any, Any], Any], init_val: Any) -> Any:
    """`jax.lax.fori_loop`: `body_fun(i, val)` for i in [lower, upper). With concrete bounds a
    scan over the indices (differentiable in reverse mode); with a traced bound a while loop
    (forward mode only, as JAX)."""
    if isinstance(lower, Var) or isinstance(upper, Var):
        def counted(carry: tuple[Any, Any]) -> tuple[Any, Any]:
            i, val = carry
            return i + np.int32(1), body_fun(i, val)

        return while_loop(lambda carry: carry[0] < upper, counted, (astype(lower, "int32"), init_val))[1]
    indices = np.arange(int(lower), int(upper), dtype=np.int32)

    def step(val: Any, i: Any) -> tuple[Any, None]:
        return body_fun(i, val), None

    if indices.size == 0:
        return init_val
    return scan(step, init_val, indices)[0]


def while_loop(cond_fun: Callable[[Any], Any], body_fun: Callable[[Any], Any], init_val: Any) -> Any:
    """`jax.lax.while_loop`: `body_fun` applied while `cond_fun(val)` holds. One node; forward
    mode (jvp) differentiates it, reverse mode is refused as JAX does: use `scan` or `fori_loop`
    with concrete bounds."""
    leaves, tree = tree_flatten(init_val)
    avals = [_aval(x) for x in leaves]

    def rebuild(ins: list[Var]) -> tuple:
        return (unflatten(tree, ins),)

    t_cond = _trace(cond_fun, avals, rebuild, "the while_loop condition")
    if t_cond.out_tree.num_leaves != 1 or out_avals(t_cond.graph)[0][1] != ():
        raise ShapeError(f"the while_loop condition must return a scalar, got {_types(out_avals(t_cond.graph))}")
    t_body = _trace(body_fun, avals, rebuild, "the while_loop body")
    if t_body.out_tree != tree or out_avals(t_body.graph) != avals:
        raise ShapeError(f"the while_loop body must return the structure and types of its input {_types(avals)}, "
                         f"got {_types(out_avals(t_body.graph))}")
    b = _target(leaves, [t_cond, t_body])
    if b is None:
        val = init_val
        while cond_fun(val):
            val = body_fun(val)
        return val
    if out_avals(t_cond.graph)[0][0] != "bool":
        t_cond = _trace(lambda *a: astype(cond_fun(*a), "bool"), avals, rebuild, "the while_loop condition")
    captured = _union([t_cond, t_body])
    results = call("while", _operands(b, [*leaves, *captured]), avals, cond=(_widen(t_cond, captured),),
                   body=(_widen(t_body, captured),), n_carry=len(leaves))
    return unflatten(tree, results)


# ---------------------------------------------------------------- custom_vjp


class custom_vjp:
    """`jax.custom_vjp`: a function whose reverse-mode derivative is the user's rule.

        @gs.custom_vjp
        def f(x): ...
        def f_fwd(x): return f(x), residuals
        def f_bwd(residuals, g): return (cotangent of x,)   # one entry per argument (None: zero)
        f.defvjp(f_fwd, f_bwd)

    `f`, `f_fwd` and `f_bwd` are traced into subgraphs of one node: evaluation runs `f`, the
    VJP runs `f_fwd` then `f_bwd`, on the server as locally. Forward mode (jvp) is refused, as
    JAX does. The functions may not close over traced values: pass them as arguments."""

    def __init__(self, fun: Callable[..., Any]):
        self.fun = fun
        self.fwd: Callable[..., Any] | None = None
        self.bwd: Callable[..., Any] | None = None
        self.__name__ = getattr(fun, "__name__", "custom_vjp")
        self.__doc__ = fun.__doc__
        self.__wrapped__ = fun
        self._in_rule = 0  # tracing fwd, which may call the function for its value

    def defvjp(self, fwd: Callable[..., Any], bwd: Callable[..., Any]) -> None:
        self.fwd, self.bwd = fwd, bwd

    def __call__(self, *args: Any) -> Any:
        if self.fwd is None or self.bwd is None:
            raise TypeError(f"custom_vjp function {self.__name__} has no rule: call {self.__name__}.defvjp(fwd, bwd)")
        fwd, bwd = self.fwd, self.bwd
        leaves, tree = tree_flatten(args)
        if self._in_rule or (not _STACK.get() and not any(isinstance(x, Var) for x in leaves)):
            return self.fun(*args)  # concrete, or the rule computing the primal value: the function itself
        avals = [_aval(x) for x in leaves]

        def rebuild(ins: list[Var]) -> tuple:
            return unflatten(tree, ins)

        t_fun = _trace(self.fun, avals, rebuild, f"custom_vjp function {self.__name__}")
        outs = out_avals(t_fun.graph)
        self._in_rule += 1
        try:
            t_fwd = _trace(fwd, avals, rebuild, f"the fwd rule of {self.__name__}")
        finally:
            self._in_rule -= 1
        pair = t_fwd.out_tree
        if pair.kind != optree.PyTreeKind.TUPLE or pair.num_children != 2 or pair.children()[0] != t_fun.out_tree \
                or out_avals(t_fwd.graph)[:len(outs)] != outs:
            raise ShapeError(f"the fwd rule of {self.__name__} must return (output, residuals) with the output of "
                             f"{self.__name__} {_types(outs)}; it returned {_types(out_avals(t_fwd.graph))}")
        res_tree = pair.children()[1]
        res_avals = out_avals(t_fwd.graph)[len(outs):]
        float_outs = [k for k, (d, _s) in enumerate(outs) if d in FLOATS]
        arg_trees = [tree_flatten(a)[1] for a in args]

        def rule(ins: list[Var]) -> tuple:
            return unflatten(res_tree, ins[:len(res_avals)]), unflatten(t_fun.out_tree, _cts(ins[len(res_avals):]))

        def _cts(given: list[Var]) -> list[Any]:
            it = iter(given)
            return [next(it) if k in float_outs else np.zeros(s, d) for k, (d, s) in enumerate(outs)]

        def bwd_flat(res: Any, g: Any) -> tuple:
            cts = bwd(res, g)
            if not isinstance(cts, (tuple, list)) or len(cts) != len(args):
                raise TypeError(f"the bwd rule of {self.__name__} must return a tuple with one cotangent per argument "
                                f"({len(args)}), got {type(cts).__name__}")
            flat: list[Any] = []
            for k, (arg, ct) in enumerate(zip(args, cts, strict=True)):
                arg_leaves = tree_flatten(arg)[0]
                if ct is None:
                    ct_leaves = [np.zeros(s, d) for d, s in map(_aval, arg_leaves)]
                else:
                    ct_leaves, ct_tree = tree_flatten(ct)
                    if ct_tree != arg_trees[k]:
                        raise TypeError(f"the bwd rule of {self.__name__}: the cotangent of argument {k} has structure "
                                        f"{ct_tree}, the argument {arg_trees[k]}")
                flat += [c for c, a in zip(ct_leaves, arg_leaves, strict=True) if dtype_of(a) in FLOATS]
            return tuple(flat)

        t_bwd = _trace(bwd_flat, [*res_avals, *(outs[k] for k in float_outs)], rule, f"the bwd rule of {self.__name__}")
        want = [a for a in avals if a[0] in FLOATS]
        if out_avals(t_bwd.graph) != want:
            raise ShapeError(f"the bwd rule of {self.__name__} returns cotangents {_types(out_avals(t_bwd.graph))}; "
                             f"the float arguments are {_types(want)}")
        if t_fun.captured or t_fwd.captured or t_bwd.captured:
            raise GraphError(f"custom_vjp function {self.__name__} or its rule closes over a traced value; pass it as an "
                             "argument")
        b = _target(leaves, [])
        if b is None:
            raise AssertionError("custom_vjp on traced values found no trace")
        results = call("custom_vjp", _operands(b, leaves), outs, fun=(t_fun.graph,), fwd=(t_fwd.graph,),
                       bwd=(t_bwd.graph,))
        return unflatten(t_fun.out_tree, results)


# ---------------------------------------------------------------- custom_jvp


class custom_jvp:
    """`jax.custom_jvp`: a function whose forward-mode derivative is the user's rule.

        @gs.custom_jvp
        def f(x): ...
        @f.defjvp
        def f_jvp(primals, tangents):        # tuples, one entry per argument
            (x,), (t,) = primals, tangents
            return f(x), tangent_of_the_output  # linear in the tangents

    `f` and the rule are traced into one node: evaluation runs `f`, forward mode runs the rule,
    and reverse mode transposes it (reverse mode through the rule with respect to the tangents),
    as JAX does. The functions may not close over traced values: pass them as arguments."""

    def __init__(self, fun: Callable[..., Any]):
        self.fun = fun
        self.jvp: Callable[..., Any] | None = None
        self.__name__ = getattr(fun, "__name__", "custom_jvp")
        self.__doc__ = fun.__doc__
        self.__wrapped__ = fun
        self._in_rule = 0  # tracing the rule, which may call the function for its value

    def defjvp(self, jvp: Callable[..., Any]) -> Callable[..., Any]:
        self.jvp = jvp
        return jvp

    def __call__(self, *args: Any) -> Any:
        if self.jvp is None:
            raise TypeError(f"custom_jvp function {self.__name__} has no rule: call {self.__name__}.defjvp(jvp)")
        rule = self.jvp
        leaves, tree = tree_flatten(args)
        if self._in_rule or (not _STACK.get() and not any(isinstance(x, Var) for x in leaves)):
            return self.fun(*args)
        avals = [_aval(x) for x in leaves]
        t_fun = _trace(self.fun, avals, lambda ins: unflatten(tree, ins), f"custom_jvp function {self.__name__}")
        outs = out_avals(t_fun.graph)
        float_args = [k for k, (d, _s) in enumerate(avals) if d in FLOATS]

        def rule_args(ins: list[Var]) -> tuple:
            it = iter(ins[len(avals):])
            tans = [next(it) if k in float_args else np.zeros(s, d) for k, (d, s) in enumerate(avals)]
            return unflatten(tree, ins[:len(avals)]), unflatten(tree, tans)

        def flat_rule(primals: tuple, tangents: tuple) -> tuple:
            got = rule(primals, tangents)
            if not isinstance(got, (tuple, list)) or len(got) != 2:
                raise TypeError(f"the jvp rule of {self.__name__} must return (primal_out, tangent_out)")
            p_leaves, p_tree = tree_flatten(got[0])
            t_leaves, t_tree = tree_flatten(got[1])
            if p_tree != t_fun.out_tree or t_tree != t_fun.out_tree:
                raise TypeError(f"the jvp rule of {self.__name__} must return (primal_out, tangent_out) with the "
                                f"structure of {self.__name__}'s output {t_fun.out_tree}")
            return (*p_leaves, *(t for t, (d, _s) in zip(t_leaves, outs, strict=True) if d in FLOATS))

        self._in_rule += 1
        try:
            t_jvp = _trace(flat_rule, [*avals, *(avals[k] for k in float_args)], rule_args,
                           f"the jvp rule of {self.__name__}")
        finally:
            self._in_rule -= 1
        want = [*outs, *(a for a in outs if a[0] in FLOATS)]
        if out_avals(t_jvp.graph) != want:
            raise ShapeError(f"the jvp rule of {self.__name__} returns {_types(out_avals(t_jvp.graph))}; the outputs "
                             f"and their tangents are {_types(want)}")
        if t_fun.captured or t_jvp.captured:
            raise GraphError(f"custom_jvp function {self.__name__} or its rule closes over a traced value; pass it as an "
                             "argument")
        b = _target(leaves, [])
        if b is None:
            raise AssertionError("custom_jvp on traced values found no trace")
        results = call("custom_jvp", _operands(b, leaves), outs, fun=(t_fun.graph,), jvp=(t_jvp.graph,))
        return unflatten(t_fun.out_tree, results)


# ---------------------------------------------------------------- vmap


def _move(x: Any, src: int, dst: int) -> Any:
    nd = len(shape_of(x))
    perm = list(range(nd))
    perm.insert(dst, perm.pop(src))
    return x if perm == sorted(perm) else transpose(x, perm)


def _axis(axis: Any, ndim: int, what: str) -> int:
    if not isinstance(axis, (int, np.integer)) or isinstance(axis, bool) or not -ndim <= int(axis) < ndim:
        raise ValueError(f"vmap: {what} axis {axis!r} is out of range for rank {ndim}")
    return int(axis) % ndim


def vmap(fun: Callable[..., Any], in_axes: Any = 0, out_axes: Any = 0) -> Callable[..., Any]:
    """`jax.vmap`: `fun` mapped over an axis of its arguments (`in_axes`: an int or None for all,
    or one per positional argument; None: not mapped) with the results stacked along `out_axes`
    (an int, or one per output leaf). It is a scan over the examples (`jax.lax.map`): one node
    whatever the batch size, any function (gradients, loops, custom rules inside), composing with
    every transform; the examples run one after another, without a vectorised speed-up."""
    name = getattr(fun, "__name__", "function")

    def mapped(*args: Any, **kwargs: Any) -> Any:
        if kwargs:
            raise TypeError(f"vmap of {name}: pass the arguments positionally (keyword arguments are not mapped)")
        axes = list(in_axes) if isinstance(in_axes, (tuple, list)) else [in_axes] * len(args)
        if len(axes) != len(args):
            raise ValueError(f"vmap of {name}: in_axes has {len(axes)} entries for {len(args)} arguments")
        batched: list[Any] = []  # per argument: (tree, [leaves moved to axis 0]) when mapped, else None
        sizes = set()
        for k, (a, ax) in enumerate(zip(args, axes, strict=True)):
            if ax is None:
                batched.append(None)
                continue
            leaves, tree = tree_flatten(a)
            moved = []
            for x in leaves:
                nd = len(shape_of(x))
                if nd == 0:
                    raise ValueError(f"vmap of {name}: argument {k} has a scalar leaf, which has no axis {ax} to map")
                i = _axis(ax, nd, f"argument {k}'s")
                sizes.add(int(shape_of(x)[i]))
                moved.append(_move(x, i, 0))
            batched.append((tree, moved))
        if not sizes:
            raise ValueError(f"vmap of {name}: in_axes maps no argument")
        if len(sizes) != 1:
            raise ValueError(f"vmap of {name}: mapped axes have different sizes {sorted(sizes)}")
        n = sizes.pop()
        if n == 0:
            raise ValueError(f"vmap of {name}: the mapped axis has size 0")
        xs = [b[1] for b in batched if b is not None]

        def body(carry: tuple, slices: list[list[Any]]) -> tuple[tuple, Any]:
            it = iter(slices)
            call_args = [a if b is None else unflatten(b[0], next(it)) for a, b in zip(args, batched, strict=True)]
            return carry, fun(*call_args)

        ys = scan(body, (), xs, length=n)[1]
        leaves, tree = tree_flatten(ys)
        outs = list(out_axes) if isinstance(out_axes, (tuple, list)) else [out_axes] * len(leaves)
        if len(outs) != len(leaves):
            raise ValueError(f"vmap of {name}: out_axes has {len(outs)} entries for {len(leaves)} outputs")
        if any(o is None for o in outs):
            raise ValueError(f"vmap of {name}: out_axes None (an output that does not vary along the batch) is not "
                             "supported; map it and take one row")
        return unflatten(tree, [_move(y, 0, _axis(o, len(shape_of(y)), "an output")) for y, o in zip(leaves, outs, strict=True)])

    mapped.__name__ = f"vmap({name})"
    mapped.__wrapped__ = fun  # type: ignore[attr-defined]
    return mapped


# ---------------------------------------------------------------- checkpoint


def checkpoint(fun: Callable[..., Any]) -> Callable[..., Any]:
    """`jax.checkpoint` (rematerialisation): `fun` traced into one node whose intermediate values
    are not kept for the backward pass. Its VJP runs `fun`'s VJP subgraph, which computes the
    forward values again inside the backward pass: a gradient holds each wrapped segment's inputs
    instead of all its intermediates, for one more forward computation of the segment."""
    name = getattr(fun, "__name__", "function")

    def wrapped(*args: Any) -> Any:
        leaves, tree = tree_flatten(args)
        if not _STACK.get() and not any(isinstance(x, Var) for x in leaves):
            return fun(*args)
        t = _trace(fun, [_aval(x) for x in leaves], lambda ins: unflatten(tree, ins), f"checkpointed {name}")
        b = _target(leaves, [t])
        if b is None:  # the traced values are all in what fun closes over
            return fun(*args)
        results = call_graph(t.graph, _operands(b, [*leaves, *t.captured]))
        return unflatten(t.out_tree, results)

    wrapped.__name__ = f"checkpoint({name})"
    wrapped.__wrapped__ = fun  # type: ignore[attr-defined]
    return wrapped


__all__ = ["checkpoint", "cond", "custom_jvp", "custom_vjp", "fori_loop", "scan", "switch", "vmap", "while_loop"]
