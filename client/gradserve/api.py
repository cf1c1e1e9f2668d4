"""The functional AD API (grad, value_and_grad, vjp, jvp, jacobian, hessian, hvp, trace).

A function is traced once per input signature (pytree structure, shapes, dtypes) into a Graph
whose inputs take the Python parameter names; the engine differentiates and runs it. The same
functions serve the local session (embedded engine) and, through `Session`, a remote one.
Called on traced values, they inline into the outer trace, so transforms nest.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from gradserve_engine.errors import GraphError
from gradserve_engine.ir import Builder, Graph, Var, type_str
from gradserve_engine.names import GRAD
from gradserve_engine.ops.core import DTYPES, FLOATS, dtype_name
from gradserve_engine.shard import analyze

from .numpy_api import Traced, dtype_of

# ---------------------------------------------------------------- pytrees


def _is_leaf(x: Any) -> bool:
    return not isinstance(x, (dict, list, tuple))


def flatten(tree: Any, prefix: str) -> tuple[list[tuple[str, Any]], Any]:
    """Leaves with their names (`params.w1`, `xs[0]`) and a structure to rebuild the tree."""
    if isinstance(tree, dict):
        leaves, defs = [], []
        for k in tree:
            if not isinstance(k, str):
                raise TypeError(f"dict keys in arguments must be strings, got {k!r} in {prefix}")
            sub, d = flatten(tree[k], f"{prefix}.{k}")
            leaves += sub
            defs.append((k, d))
        return leaves, ("dict", tuple(defs))
    if isinstance(tree, (list, tuple)):
        leaves, defs = [], []
        for i, v in enumerate(tree):
            sub, d = flatten(v, f"{prefix}[{i}]")
            leaves += sub
            defs.append(d)
        return leaves, (type(tree).__name__, tuple(defs))
    return [(prefix, tree)], "*"


def unflatten(treedef: Any, leaves: Sequence[Any]) -> Any:
    return _build(treedef, iter(leaves))


def _build(d: Any, it: Any) -> Any:
    # a module-level function, not a closure: a self-referencing closure would form a reference
    # cycle that keeps every call's results alive until the cycle collector runs
    if d == "*":
        return next(it)
    kind, children = d
    if kind == "dict":
        return {k: _build(c, it) for k, c in children}
    items = [_build(c, it) for c in children]
    return tuple(items) if kind == "tuple" else items


def _is_array_leaf(x: Any) -> bool:
    return isinstance(x, (Var, np.ndarray, np.generic, int, float, bool)) or hasattr(x, "__gradserve_array__")


def _as_array(x: Any) -> Any:
    if isinstance(x, Var):
        return x
    if hasattr(x, "__gradserve_array__"):
        return x.__gradserve_array__()
    a = np.asarray(x)
    if dtype_name(a.dtype) not in DTYPES:
        raise TypeError(f"arrays of dtype {a.dtype} are not supported; use one of {list(DTYPES)}")
    return a


def _fast_key(x: Any) -> Any:
    """A hashable key of a call's argument structure, dtypes and shapes (cheap: the hot path)."""
    t = type(x)
    if t is np.ndarray:
        return (x.dtype, x.shape)
    if t is float or t is int or t is bool:
        return t
    if t is tuple or t is list:
        return (t, tuple(_fast_key(v) for v in x))
    if t is dict:
        return (dict, tuple(x), tuple(_fast_key(v) for v in x.values()))
    if isinstance(x, Var):
        return (Var, x.dtype, x.shape)
    if isinstance(x, np.generic):
        return (t,)
    if hasattr(x, "__gradserve_array__"):
        a = x.__gradserve_array__()
        return (a.dtype, a.shape)
    try:
        return ("static", t, hash(x), x)
    except TypeError:
        raise TypeError(f"argument leaf {x!r} is neither an array nor hashable static data") from None


_SCALAR = {float: np.float64, int: np.int64, bool: np.bool_}


def _leaves(x: Any, out: list[Any]) -> None:
    """Append the array leaves of `x` in flatten order, as arrays (the hot path of a cached call)."""
    t = type(x)
    if t is np.ndarray or isinstance(x, (Var, np.generic)):
        out.append(x)
    elif t in _SCALAR:
        out.append(_SCALAR[t](x))
    elif t is tuple or t is list:
        for v in x:
            _leaves(v, out)
    elif t is dict:
        for v in x.values():
            _leaves(v, out)
    elif hasattr(x, "__gradserve_array__"):
        out.append(x.__gradserve_array__())


# ---------------------------------------------------------------- tracing


def _param_names(f: Callable, n: int) -> list[str]:
    try:
        params = list(inspect.signature(f).parameters.values())
    except (TypeError, ValueError):
        params = []
    names = []
    for p in params:
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            names.append(p.name)
        elif p.kind == p.VAR_POSITIONAL:
            names += [f"{p.name}[{i}]" for i in range(n - len(names))]
            break
    names += [f"arg{i}" for i in range(len(names), n)]
    return names[:n]


class TracedFunction:
    """A traced function for one input signature: its graph and how to map arguments."""

    def __init__(self, graph: Graph, in_names: list[str], out_treedef: Any, out_names: list[str]):
        self.graph, self.in_names, self.out_treedef, self.out_names = graph, in_names, out_treedef, out_names


def _signature(args: tuple) -> tuple:
    leaves, treedef = flatten(list(args), "")
    sig = []
    for _, x in leaves:
        if _is_array_leaf(x):
            a = x if isinstance(x, Var) else _as_array(x)
            sig.append((dtype_of(a), tuple(a.shape)))
        else:
            try:
                hash(x)
            except TypeError:
                raise TypeError(f"argument leaf {x!r} is neither an array nor hashable static data") from None
            sig.append(("static", x))
    return treedef, tuple(sig)


def _sig_text(names: list[str], sig: tuple) -> dict[str, str]:
    return {n: (type_str(*s) if s[0] != "static" else repr(s[1])) for n, s in zip(names, sig, strict=True)}


def trace_function(f: Callable, args: tuple) -> TracedFunction:
    """Trace `f(*args)` into a graph: array leaves become inputs named after the parameters."""
    names = _param_names(f, len(args))
    leaves: list[tuple[str, Any]] = []
    for name, a in zip(names, args, strict=True):
        leaves += flatten(a, name)[0]
    b = Builder(Traced)
    traced_leaves = []
    in_names = []
    for name, x in leaves:
        if _is_array_leaf(x):
            a = _as_array(x)
            v = b.input(name, dtype_of(a), tuple(a.shape))
            in_names.append(name)
            traced_leaves.append(v)
        else:
            traced_leaves.append(x)
    it = iter(traced_leaves)
    traced_args = [unflatten(flatten(a, "")[1], [next(it) for _ in flatten(a, "")[0]]) for a in args]
    out = f(*traced_args)
    out_leaves, out_treedef = flatten(out, "out")
    if out_treedef == "*":
        out_leaves = [("out", out)]
    outputs = []
    for name, v in out_leaves:
        if not isinstance(v, Var):
            if not _is_array_leaf(v):
                raise TypeError(f"{getattr(f, '__name__', 'function')} returned {v!r} at {name}; outputs must be arrays")
            v = b.const(_as_array(v))
        elif v.builder is not b:
            raise GraphError(f"output {name} comes from another trace (a traced value leaked out of its function)")
        outputs.append((name, v))
    graph = b.build(outputs)
    return TracedFunction(graph, in_names, out_treedef, [n for n, _ in out_leaves])


# ---------------------------------------------------------------- the functional API over an engine-like backend


class Functional:
    """grad & co. over a backend with the Engine's methods (`evaluate`, `vjp`, `jvp`, ...)."""

    def __init__(self, backend: Any):
        self.backend = backend
        self._traces: dict[tuple, TracedFunction] = {}
        self._last_sig: dict[int, tuple] = {}
        self._lock = threading.Lock()

    # ---- tracing with a cache per (function, signature)
    def traced(self, f: Callable, args: tuple) -> TracedFunction:
        treedef, sig = _signature(args)
        key = (f, treedef, sig)
        with self._lock:
            t = self._traces.get(key)
        if t is not None:
            self._note_hit()
            return t
        names = [n for a_name, a in zip(_param_names(f, len(args)), args, strict=True) for n, _ in flatten(a, a_name)[0]]
        with self._lock:
            prev = self._last_sig.get(id(f))
            self._last_sig[id(f)] = (treedef, sig)
        if prev is None:
            why = f"trace miss: first call of {getattr(f, '__qualname__', f)}"
        elif prev[0] != treedef:
            why = f"trace miss: argument structure of {getattr(f, '__qualname__', f)} changed"
        else:
            old, new = _sig_text(names, prev[1]), _sig_text(names, sig)
            diff = ", ".join(f"{n}: {old[n]} -> {new[n]}" for n in names if old.get(n) != new[n])
            why = f"trace miss: input signature of {getattr(f, '__qualname__', f)} changed ({diff})"
        self._note_miss(why)
        t = trace_function(f, args)
        with self._lock:
            if len(self._traces) > 4096:
                self._traces.clear()
            self._traces[key] = t
        return t

    def _note_hit(self) -> None:
        note = getattr(self.backend, "note_hit", None)
        if note:
            note()

    def _note_miss(self, why: str) -> None:
        note = getattr(self.backend, "note_miss", None)
        if note:
            note(why)

    @staticmethod
    def _feed(t: TracedFunction, args: tuple) -> dict[str, Any]:
        leaves = [x for a in args for _, x in flatten(a, "")[0] if _is_array_leaf(x)]
        return {n: _as_array(x) for n, x in zip(t.in_names, leaves, strict=True)}

    @staticmethod
    def _argnum_leaves(t: TracedFunction, f: Callable, args: tuple, argnums: Sequence[int]) -> list[list[str]]:
        """The input names of each differentiated argument's leaves."""
        names = _param_names(f, len(args))
        out = []
        for k in argnums:
            if not -len(args) <= k < len(args):
                raise ValueError(f"argnums {k} is out of range for {len(args)} positional arguments")
            leaves = [n for n, x in flatten(args[k], names[k])[0] if _is_array_leaf(x)]
            for n in leaves:
                if t.graph.input(n).dtype not in FLOATS:
                    raise TypeError(f"cannot differentiate with respect to argument {n!r} of dtype "
                                    f"{t.graph.input(n).dtype}; pass floats, or leave it out of argnums")
            out.append(leaves)
        return out

    def _outputs(self, t: TracedFunction, values: dict[str, Any]) -> Any:
        return unflatten(t.out_treedef, [values[n] for n in t.out_names])

    # ---- public transforms
    def grad(self, f: Callable, argnums: int | Sequence[int] = 0, has_aux: bool = False,
             batch_axes: Mapping[str, int] | None = None) -> Callable:
        vg = self.value_and_grad(f, argnums, has_aux, batch_axes)

        @functools.wraps(f)
        def g(*args: Any) -> Any:
            value, grads = vg(*args)
            return (grads, value[1]) if has_aux else grads

        return g

    def value_and_grad(self, f: Callable, argnums: int | Sequence[int] = 0, has_aux: bool = False,
                       batch_axes: Mapping[str, int] | None = None) -> Callable:
        multi = not isinstance(argnums, int)
        nums = tuple(argnums) if multi else (argnums,)
        compiled: dict[Any, Callable[[tuple], tuple[Any, Any]]] = {}

        @functools.wraps(f)
        def vg(*args: Any) -> tuple[Any, Any]:
            key = _fast_key(args)
            call = compiled.get(key)
            if call is None:
                call = compiled[key] = self._compile_value_and_grad(f, args, nums, multi, has_aux, batch_axes)
            else:
                self._note_hit()
            return call(args)

        return vg

    def _compile_value_and_grad(self, f: Callable, args: tuple, nums: tuple[int, ...], multi: bool,
                                has_aux: bool, batch_axes: Mapping[str, int] | None) -> Callable[[tuple], tuple[Any, Any]]:
        """Trace once for this signature and return the steady-state call: leaves in, plan run,
        pytrees out, with no re-validation (the signature key guarantees the types)."""
        t = self.traced(f, args)
        loss = t.out_names[0]
        dtype, shape = t.graph.aval(dict(t.graph.outputs)[loss])
        if (not has_aux and len(t.out_names) != 1) or dtype not in FLOATS or shape != ():
            raise TypeError(f"grad needs a function with one scalar float output; "
                            f"{getattr(f, '__name__', 'f')} returned {', '.join(t.out_names)} "
                            f"({type_str(dtype, shape)}{' ...' if len(t.out_names) > 1 else ''}); "
                            "use vjp or jacobian for other outputs, or has_aux=True")
        groups = self._argnum_leaves(t, f, args, nums)
        wrt = [n for grp in groups for n in grp]
        treedefs = [flatten(args[k], "")[1] for k in nums]
        axes = self._batch_axes(t, f, args, batch_axes)
        grad_plan = getattr(self.backend, "grad_plan", None)
        if axes:
            analyze(t.graph, axes)  # refuse, naming the node, a graph that mixes examples
        extra = {"batch_axes": axes} if axes else {}
        if grad_plan is not None:
            plan = grad_plan(t.graph, wrt, loss)
            order = [t.in_names.index(name) for name, _ in plan.inputs]

            def run(values: list[Any]) -> tuple[dict, dict]:
                res = plan.run_values([values[i] for i in order])
                return res, {n: res[GRAD + n] for n in wrt}
        else:
            def run(values: list[Any]) -> tuple[dict, dict]:
                feed = dict(zip(t.in_names, values, strict=True))
                outs, grads = self.backend.vjp(t.graph, feed, wrt, outputs=[loss], **extra)
                if len(t.out_names) > 1:
                    outs = {**outs, **self.backend.evaluate(t.graph, feed, t.out_names[1:])}
                return outs, grads

        def call(args: tuple) -> tuple[Any, Any]:
            values: list[Any] = []
            for a in args:
                _leaves(a, values)
            outs, grads = run(values)
            per_arg = [unflatten(d, [grads[n] for n in grp]) if grp else None
                       for d, grp in zip(treedefs, groups, strict=True)]
            value = unflatten(t.out_treedef, [outs[n] for n in t.out_names])
            return value, tuple(per_arg) if multi else per_arg[0]

        return call

    @staticmethod
    def _batch_axes(t: TracedFunction, f: Callable, args: tuple, batch_axes: Mapping[str, int] | None) -> dict[str, int]:
        """Batch axes by input name; a parameter's name applies to every array leaf of it."""
        if not batch_axes:
            return {}
        names = _param_names(f, len(args))
        out: dict[str, int] = {}
        for key, axis in batch_axes.items():
            if key in t.in_names:
                out[key] = int(axis)
            elif key in names:
                leaves = [n for n, x in flatten(args[names.index(key)], key)[0] if _is_array_leaf(x)]
                out.update({n: int(axis) for n in leaves})
            else:
                raise ValueError(f"batch_axes names {key!r}, which is neither a parameter {names} nor an input {t.in_names}")
        return out

    def vjp(self, f: Callable, *primals: Any) -> tuple[Any, Callable]:
        t = self.traced(f, primals)
        feed = self._feed(t, primals)
        groups = self._argnum_leaves_floats(t, f, primals)
        out = self._outputs(t, self.backend.evaluate(t.graph, feed))
        wrt = [n for grp in groups for n in grp]
        float_outs = [n for n in t.out_names if t.graph.aval(dict(t.graph.outputs)[n])[0] in FLOATS]

        def vjp_fn(cotangent: Any) -> tuple:
            cts = [x for _, x in flatten(cotangent, "")[0]] if t.out_treedef != "*" else [cotangent]
            if len(cts) != len(t.out_names):
                raise ValueError(f"cotangent has {len(cts)} leaves for {len(t.out_names)} outputs {t.out_names}")
            seeds = {n: _as_array(c) for n, c in zip(t.out_names, cts, strict=True) if n in float_outs}
            _, grads = self.backend.vjp(t.graph, feed, wrt, seeds=seeds, outputs=list(seeds))
            return tuple(unflatten(flatten(p, "")[1], [grads[n] for n in grp]) if grp else None
                         for p, grp in zip(primals, groups, strict=True))

        return out, vjp_fn

    def _argnum_leaves_floats(self, t: TracedFunction, f: Callable, args: tuple) -> list[list[str]]:
        names = _param_names(f, len(args))
        return [[n for n, x in flatten(a, name)[0] if _is_array_leaf(x) and t.graph.input(n).dtype in FLOATS]
                for name, a in zip(names, args, strict=True)]

    def jvp(self, f: Callable, primals: Sequence[Any], tangents: Sequence[Any]) -> tuple[Any, Any]:
        primals, tangents = tuple(primals), tuple(tangents)
        if len(primals) != len(tangents):
            raise ValueError(f"jvp got {len(primals)} primals but {len(tangents)} tangents")
        t = self.traced(f, primals)
        groups = self._argnum_leaves_floats(t, f, primals)
        tans = {}
        for grp, tan in zip(groups, tangents, strict=True):
            tleaves = [x for _, x in flatten(tan, "")[0]]
            if len(tleaves) != len(grp):
                raise ValueError(f"tangent {tan!r} does not match the float leaves {grp} of its primal")
            tans.update({n: _as_array(x) for n, x in zip(grp, tleaves, strict=True)})
        outs, touts = self.backend.jvp(t.graph, self._feed(t, primals), tans)
        tout = {n: touts.get(n, np.zeros_like(outs[n]) if not isinstance(outs[n], Var) else outs[n] * 0)
                for n in t.out_names}
        return self._outputs(t, outs), self._outputs(t, tout)

    def jacobian(self, f: Callable, argnums: int | Sequence[int] = 0) -> Callable:
        multi = not isinstance(argnums, int)
        nums = tuple(argnums) if multi else (argnums,)

        @functools.wraps(f)
        def jac(*args: Any) -> Any:
            t = self.traced(f, args)
            groups = self._argnum_leaves(t, f, args, nums)
            wrt = [n for grp in groups for n in grp]
            res = self.backend.jacobian(t.graph, self._feed(t, args), wrt, t.out_names)

            def per_output(o: str) -> Any:
                per_arg = [unflatten(flatten(args[k], "")[1], [res[(o, n)] for n in grp])
                           for k, grp in zip(nums, groups, strict=True)]
                return tuple(per_arg) if multi else per_arg[0]

            return unflatten(t.out_treedef, [per_output(o) for o in t.out_names])

        return jac

    def hessian(self, f: Callable, argnums: int | Sequence[int] = 0) -> Callable:
        multi = not isinstance(argnums, int)
        nums = tuple(argnums) if multi else (argnums,)

        @functools.wraps(f)
        def hess(*args: Any) -> Any:
            t = self.traced(f, args)
            if len(t.out_names) != 1 or t.graph.aval(t.graph.outputs[0][1])[1] != ():
                raise TypeError("hessian needs a function with one scalar float output")
            groups = self._argnum_leaves(t, f, args, nums)
            for k, grp in zip(nums, groups, strict=True):
                if len(grp) != 1:
                    raise TypeError(f"hessian argument {k} must be a single array, not a pytree of {len(grp)} leaves")
            wrt = [grp[0] for grp in groups]
            res = self.backend.hessian(t.graph, self._feed(t, args), wrt, t.out_names[0])
            if not multi:
                return res[(wrt[0], wrt[0])]
            return tuple(tuple(res[(a, b)] for b in wrt) for a in wrt)

        return hess

    def hvp(self, f: Callable, primals: Sequence[Any], vectors: Sequence[Any]) -> tuple:
        """Hessian-vector product of scalar `f` at `primals` along `vectors` (forward over reverse)."""
        primals, vectors = tuple(primals), tuple(vectors)
        t = self.traced(f, primals)
        groups = self._argnum_leaves_floats(t, f, primals)
        wrt = [n for grp in groups for n in grp]
        vecs = {}
        for grp, v in zip(groups, vectors, strict=True):
            vecs.update({n: _as_array(x) for n, x in zip(grp, [x for _, x in flatten(v, "")[0]], strict=True)})
        res = self.backend.hvp(t.graph, self._feed(t, primals), wrt, t.out_names[0], vecs)
        return tuple(unflatten(flatten(p, "")[1], [res[n] for n in grp]) if grp else None
                     for p, grp in zip(primals, groups, strict=True))

    def trace(self, f: Callable, *args: Any) -> Graph:
        return trace_function(f, args).graph


__all__ = ["Functional", "Traced", "flatten", "trace_function", "unflatten"]
