"""The functional AD API (grad, value_and_grad, vjp, jvp, jacobian, hessian, hvp, trace).

A function is traced once per input signature (pytree structure, shapes, dtypes of the
arguments, positional and keyword, and of the arrays it captures; values of the Python scalars
it captures) into a Graph whose inputs take the Python parameter names; the engine
differentiates and runs it. Arrays the function reads from closures, globals and defaults are
inputs too, read at every call (see `capture.py`). The same functions serve the local session
(embedded engine) and, through `Session`, a remote one. Called on traced values, they inline
into the outer trace, so transforms nest.
"""

from __future__ import annotations

import functools
import inspect
import operator
import threading
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import numpy as np

from gradserve_engine.autodiff import vjp_names
from gradserve_engine.errors import GraphError
from gradserve_engine.ir import Builder, Graph, Var, type_str
from gradserve_engine.ops.core import DTYPES, FLOATS, dtype_name
from gradserve_engine.shard import analyze

from .capture import Capture, register_transform
from .numpy_api import Traced, dtype_of, traced_constructors
from .pytree import flatten, flatten_call, register_pytree_node, tree_flatten, unflatten
from .refs import TensorRef

# ---------------------------------------------------------------- leaves


def _is_array_leaf(x: Any) -> bool:
    return isinstance(x, (Var, np.ndarray, np.generic, int, float, bool, TensorRef)) or hasattr(x, "__gradserve_array__")


def _as_array(x: Any) -> Any:
    """An array leaf as an array; traced values and server-side tensors (TensorRef, which has
    the dtype and shape a trace needs) pass as they are."""
    if isinstance(x, (Var, TensorRef)):
        return x
    if hasattr(x, "__gradserve_array__"):
        return x.__gradserve_array__()
    a = np.asarray(x)
    if dtype_name(a.dtype) not in DTYPES:
        raise TypeError(f"arrays of dtype {a.dtype} are not supported; use one of {list(DTYPES)}")
    return a


def _slot_value(x: Any) -> Any:
    """A leaf given for a slot whose dtype the graph fixes (a seed, cotangent, tangent or vector):
    a Python scalar stays one, weakly typed, for the engine's cast rule to give it the slot's
    dtype (`gradserve_engine.engine.conform`); anything else as an array."""
    t = type(x)
    return x if t is float or t is int or t is bool else _as_array(x)


def _leaf_key(x: Any) -> Any:
    """A hashable key of one argument leaf: dtype and shape of an array, the value of static data
    (cheap: the hot path)."""
    t = type(x)
    if t is np.ndarray:
        return (x.dtype, x.shape)
    if t is float or t is int or t is bool:
        return t
    if isinstance(x, Var):
        return (Var, x.ir_dtype, x.shape)
    if t is TensorRef:
        return (TensorRef, x.dtype, x.shape)
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
_NP_SCALARS = frozenset({np.float64, np.float32, np.int64, np.int32, np.bool_})


def _value(x: Any) -> Any:
    """An array leaf as it is fed."""
    t = type(x)
    if t in _SCALAR:
        return _SCALAR[t](x)
    if t is not np.ndarray and hasattr(x, "__gradserve_array__"):
        return x.__gradserve_array__()
    return x


class _NotPlain(Exception):
    """An argument `_plain_key` does not cover: optree flattens the call."""


def _plain_key(x: Any, leaves: list[Any]) -> Any:
    """A hashable key of one argument made of dicts, lists and tuples (exactly those types) of
    Python numbers, numpy arrays and scalars, strings and None, appending its leaves in optree's
    flatten order (dicts in insertion order, None an empty subtree): the key pins the structure
    and each leaf's exact type, dtype and shape, as `(spec, sig)` would, without optree's walk.
    Raises _NotPlain for anything else. Each kind of key begins with its own type, so no two
    kinds compare equal."""
    t = type(x)
    if t is np.ndarray:
        leaves.append(x)
        return (np.ndarray, x.dtype, x.shape)
    if t is float or t is int or t is bool:
        leaves.append(x)
        return t
    if t is dict:
        return (dict, tuple(x), tuple([_plain_key(v, leaves) for v in x.values()]))
    if t is list or t is tuple:
        return (t, tuple([_plain_key(v, leaves) for v in x]))
    if x is None:
        return None
    if t in _NP_SCALARS:
        leaves.append(x)
        return (t,)
    if t is str:
        leaves.append(x)
        return (str, x)
    raise _NotPlain


def _call_key(args: tuple, kwargs: dict[str, Any]) -> tuple[list[Any], Any] | None:
    """`(leaves, key)` of a call (its keyword arguments in `_kwargs` order) by `_plain_key`, the
    leaves in the order of `flatten_call(args, kwargs)`; None when an argument is not plain."""
    leaves: list[Any] = []
    keys: list[Any] = []
    try:
        for a in args:  # `_plain_key`'s commonest cases inline
            t = type(a)
            if t is float or t is int or t is bool:
                leaves.append(a)
                keys.append(t)
            elif t is np.ndarray:
                leaves.append(a)
                keys.append((np.ndarray, a.dtype, a.shape))
            else:
                keys.append(_plain_key(a, leaves))
        kw = _plain_key(kwargs, leaves) if kwargs else None
    except _NotPlain:
        return None
    return leaves, (tuple(keys), kw)


def _leaves(x: Any, out: list[Any]) -> None:
    """Append the array leaves of `x` in flatten order, as arrays."""
    out.extend(_value(v) for v in tree_flatten(x)[0] if _is_array_leaf(v))


def _leaf_text(x: Any) -> str:
    if _is_array_leaf(x):
        a = x if isinstance(x, Var) else _as_array(x)
        return type_str(dtype_of(a), tuple(a.shape))
    return repr(x)


def _kwargs(kwargs: Mapping[str, Any] | None) -> dict[str, Any]:
    """Keyword arguments in a canonical (sorted) order: their order in a call is no signature."""
    if not kwargs:
        return {}
    for k in kwargs:
        if k.startswith("<"):
            raise ValueError(f"keyword argument {k!r}: names beginning with '<' are those of captured values")
    return {k: kwargs[k] for k in sorted(kwargs)}


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


def _positional_param(f: Callable, k: int) -> str | None:
    """The name of `f`'s positional parameter number `k` (for an argnum passed by keyword)."""
    try:
        params = [p for p in inspect.signature(f).parameters.values() if p.kind == p.POSITIONAL_OR_KEYWORD]
    except (TypeError, ValueError):
        return None
    return params[k].name if 0 <= k < len(params) else None


def _named_leaves(f: Callable, args: tuple, kwargs: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """Every leaf of a call's arguments with its name, in the order of `tree_flatten((args, kwargs))`."""
    out: list[tuple[str, Any]] = []
    for name, a in zip(_param_names(f, len(args)), args, strict=True):
        out += flatten(a, name)[0]
    for k, v in kwargs.items():
        out += flatten(v, k)[0]
    return out


def shaped_like(value: Any, label: str) -> Callable[[Mapping[str, Any]], Any]:
    """`rebuild(results)`: a tree shaped like argument `value` (named `label`) holding the result
    of each array leaf by input name (None where there is none: an integer array, say); leaves
    that are static data keep their value. Computed once per signature, cheap to call."""
    named, spec = flatten(value, label)
    entries = [(n, _is_array_leaf(x), x) for n, x in named]
    if spec.is_leaf():  # one leaf (the common case of an array argument): no unflatten
        (name, array, static), = entries
        return (lambda results: results.get(name)) if array else (lambda results: static)

    def rebuild(results: Mapping[str, Any]) -> Any:
        return unflatten(spec, [results.get(n) if array else x for n, array, x in entries])

    return rebuild


class TracedFunction:
    """A traced function for one input signature: its graph and how to map arguments.

    `in_names` are the graph's inputs: first the arguments' array leaves (`arg_leaves`: their
    positions among the call's leaves), then the captured arrays the graph reads (`cap_arrays`:
    their positions among `Capture.read()`'s arrays)."""

    def __init__(self, graph: Graph, in_names: list[str], out_treedef: Any, out_names: list[str],
                 arg_leaves: Sequence[int] = (), cap_arrays: Sequence[int] = (), capture: Capture | None = None):
        self.graph, self.in_names, self.out_treedef, self.out_names = graph, in_names, out_treedef, out_names
        self.arg_leaves, self.cap_arrays, self.capture = list(arg_leaves), list(cap_arrays), capture
        self.keep: Any = None  # the captured values whose ids the cache key holds

    def values(self, leaves: Sequence[Any], captured: Sequence[Any]) -> list[Any]:
        """The input values, in `in_names` order, from a call's leaves and its captured arrays."""
        return [_value(leaves[i]) for i in self.arg_leaves] + [captured[i] for i in self.cap_arrays]


def _feeder(t: TracedFunction, example: Sequence[Any], order: Sequence[int]) -> Callable[[Sequence, list], list]:
    """`feed(leaves, captured)`: the input values of `t` in `order` (positions in `t.in_names`)
    from a call's leaves and captured arrays, as `t.values` gives them, specialised once for
    calls whose leaves have the signature of `example`'s: the positions are fixed, and the
    leaves come as fed but for Python numbers, converted here by their type (the signature pins
    it; np.float64 of an np.float64 is harmless)."""
    n, first_cap = len(t.arg_leaves), len(example)
    picks = [t.arg_leaves[k] if k < n else first_cap + t.cap_arrays[k - n] for k in order]
    convert = [(j, _SCALAR[type(example[i])]) for j, i in enumerate(picks)
               if i < first_cap and type(example[i]) in _SCALAR]
    m = len(picks)
    if picks == list(range(m)):  # in order: the leaves, then the captured arrays (trailing ones unread)
        def feed_all(leaves: Sequence, captured: list) -> list:
            values = [*leaves, *captured]
            if len(values) != m:
                del values[m:]
            for j, conv in convert:
                values[j] = conv(values[j])
            return values
        return feed_all

    def feed(leaves: Sequence, captured: list) -> list:
        both = [*leaves, *captured]
        values = [both[i] for i in picks]
        for j, conv in convert:
            values[j] = conv(values[j])
        return values
    return feed


def _plan_call(run: Callable[[list], dict[str, Any]], feed: Callable[[Sequence, list], list], t: TracedFunction,
               sel: _Selection, selected: Sequence[tuple[str, Any]], groups: Sequence[Sequence[str]],
               grad_names: Mapping[str, str], has_aux: bool, grad_only: bool) -> Callable[[Sequence, list], Any]:
    """The steady-state call of a gradient over a plan whose one result dict holds the outputs
    and the gradients (`grad_names`: the result name of each input's): each argument's gradient
    is read from it as directly as the argument's structure allows, with no dict built."""
    parts: list[Any] = []  # per selected argument: None (no array leaf, no gradient), the result
    for (label, value), grp in zip(selected, groups, strict=True):  # name (one array), or the structure
        named, spec = flatten(value, label)  # and per leaf (result name, None) or (None, static leaf)
        if not grp:
            parts.append(None)
        elif spec.is_leaf():
            parts.append(grad_names[grp[0]])
        else:
            parts.append((spec, [(grad_names[n], None) if _is_array_leaf(x) else (None, x) for n, x in named]))
    grads_of: Callable[[dict[str, Any]], Any]
    if not sel.by_name and all(type(p) is str for p in parts):  # each argument one array: the commonest
        keys = tuple(parts)
        if not sel.nums_multi:
            grads_of = operator.itemgetter(keys[0])
        elif len(keys) > 1:
            grads_of = operator.itemgetter(*keys)  # a tuple of them
        else:
            def grads_of(res: dict[str, Any]) -> Any:
                return tuple([res[k] for k in keys])
    else:
        single = not sel.by_name and not sel.nums_multi

        def grads_of(res: dict[str, Any]) -> Any:
            per_arg = [None if p is None else res[p] if type(p) is str
                       else unflatten(p[0], [x if k is None else res[k] for k, x in p[1]]) for p in parts]
            return per_arg[0] if single else sel.pack(per_arg)

    if grad_only and not has_aux:
        return lambda leaves, captured: grads_of(run(feed(leaves, captured)))
    loss, out_names, out_treedef = t.out_names[0], t.out_names, t.out_treedef
    one = not has_aux and out_treedef.is_leaf()  # the value is the loss itself

    def call(leaves: Sequence, captured: list) -> Any:
        res = run(feed(leaves, captured))
        value = res[loss] if one else unflatten(out_treedef, [res[n] for n in out_names])
        return (grads_of(res), value[1]) if grad_only else (value, grads_of(res))
    return call


def _held_weakly(plan: Any, again: Callable[[], Any], touch: Callable[[Any], bool]) -> Callable[[list], dict[str, Any]]:
    """`plan.run_values`, the plan held weakly: the backend's cache owns it, within its budget (a
    GPU plan's CUDA graphs hold device memory), and each call marks it used there (`touch`, so
    that the cache drops the least recently run); once the cache dropped it, the call asks the
    backend for it again (`again`)."""
    ref = weakref.ref(plan)

    def run(values: list) -> dict[str, Any]:
        nonlocal ref
        p = ref()
        if p is None or not touch(p):
            p = again()
            ref = weakref.ref(p)
        return p.run_values(values)

    return run


async def _finished(pending: Awaitable[tuple[dict, dict]], finish: Callable[[dict, dict], Any]) -> Any:
    """`finish(outputs, gradients)` of an awaitable backend's result, once it has come."""
    return finish(*await pending)


def trace_function(f: Callable, args: tuple, kwargs: Mapping[str, Any] | None = None, capture: Capture | None = None,
                   captured: list[Any] | None = None) -> TracedFunction:
    """Trace `f(*args, **kwargs)` into a graph: array leaves become inputs named after the
    parameters, and so do the arrays `f` captures (`<global>.W`, ...; see `capture.py`)."""
    kwargs = _kwargs(kwargs)
    named = _named_leaves(f, args, kwargs)
    b = Builder(Traced)
    traced_leaves, in_names, arg_leaves = [], [], []
    for i, (name, x) in enumerate(named):
        if _is_array_leaf(x):
            a = _as_array(x)
            traced_leaves.append(b.input(name, dtype_of(a), tuple(a.shape)))
            in_names.append(name)
            arg_leaves.append(i)
        else:
            traced_leaves.append(x)
    traced_args, traced_kwargs = unflatten(flatten_call(args, kwargs)[1], traced_leaves)
    if capture is None:
        capture = Capture(f)
    if captured is None:
        captured = capture.read()[2]
    fn, cap_inputs, done = capture.substitute(b, captured)
    try:
        with traced_constructors():
            out = fn(*traced_args, **traced_kwargs)
    finally:
        done()
    out_leaves, out_treedef = flatten(out, "out")
    if out_treedef.is_leaf():
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
    if cap_inputs:  # a captured array the computation does not read is no input (one only sized, say)
        used = {i for n in graph.nodes for i in n.inputs} | {vid for _, vid in graph.outputs}
        n = len(in_names)
        dead = {k for k in range(len(cap_inputs)) if n + k not in used}
        if dead:
            b._inputs = [e for j, e in enumerate(b._inputs) if j - n not in dead]
            graph = b.build(outputs)
            cap_inputs = [c for k, c in enumerate(cap_inputs) if k not in dead]
    t = TracedFunction(graph, in_names + [name for _, name in cap_inputs], out_treedef, [n for n, _ in out_leaves],
                       arg_leaves, [k for k, _ in cap_inputs], capture)
    t.keep = captured
    return t


# ---------------------------------------------------------------- which arguments a transform differentiates


class _Selection:
    """`argnums` (positions) and `argnames` (parameter or keyword names) of a transform.

    argnums defaults to 0, or to none when argnames is given. The result is shaped like the
    selection: one argument's gradient for an int (a str), a tuple for a sequence, and
    `(by argnums, by argnames)` when both are given."""

    def __init__(self, argnums: int | Sequence[int] | None, argnames: str | Sequence[str] | None):
        self.both = argnames is not None and argnums is not None
        if argnums is None:
            argnums = 0 if argnames is None else ()
        self.nums_multi = not isinstance(argnums, int) and (argnames is None or self.both)
        self.nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
        self.names_multi = argnames is not None and not isinstance(argnames, str)
        self.names: tuple[str, ...] = (() if argnames is None else (argnames,) if isinstance(argnames, str)
                                       else tuple(argnames))
        self.by_name = argnames is not None

    def resolve(self, f: Callable, args: tuple, kwargs: Mapping[str, Any]) -> list[tuple[str, Any]]:
        """`(parameter name, value)` of each selected argument."""
        names = _param_names(f, len(args))
        out = []
        for k in self.nums:
            if -len(args) <= k < len(args):
                out.append((names[k], args[k]))
                continue
            p = _positional_param(f, k)
            if p is None or p not in kwargs:
                raise ValueError(f"argnums {k} is out of range for {len(args)} positional arguments")
            out.append((p, kwargs[p]))
        for n in self.names:
            if n in kwargs:
                out.append((n, kwargs[n]))
            elif n in names:
                out.append((n, args[names.index(n)]))
            else:
                raise ValueError(f"argnames {n!r} names no argument of this call: positional {names}, "
                                 f"keyword {list(kwargs)}")
        return out

    def pack(self, results: Sequence[Any]) -> Any:
        by_num, by_name = list(results[:len(self.nums)]), list(results[len(self.nums):])
        nums = tuple(by_num) if self.nums_multi else (by_num[0] if by_num else None)
        if not self.by_name:
            return nums
        names = tuple(by_name) if self.names_multi else by_name[0]
        return (nums, names) if self.both else names


# ---------------------------------------------------------------- the functional API over an engine-like backend


class Functional:
    """grad & co. over a backend with the Engine's methods (`evaluate`, `vjp`, `jvp`, ...).

    A `deferred` backend (the asyncio session) has instead `vjp_outputs(graph, inputs, wrt,
    loss, others, batch_axes)`, which returns an awaitable of (outputs, gradients): its grad
    and value_and_grad functions trace and build the request at the call and return an
    awaitable of the result."""

    def __init__(self, backend: Any):
        self.backend = backend
        self.refs = bool(getattr(backend, "accepts_refs", False))  # a remote session resolves TensorRefs
        self._traces: dict[tuple, TracedFunction] = {}
        self._captures: dict[tuple, Capture] = {}
        self._last: dict[Any, tuple] = {}
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            self._traces.clear()
            self._captures.clear()
            self._last.clear()

    # ---- captured state
    def capture(self, f: Callable, constants: bool = False) -> Capture:
        """The current scan of what `f` captures (scanned on first use and after each trace miss)."""
        cap = self._captures.get((f, constants))
        return cap if cap is not None else self._rescan(f, constants)

    def _rescan(self, f: Callable, constants: bool, cap: Capture | None = None) -> Capture:
        """Scan `f` afresh (or take `cap`) as its current capture; the constants fallback sticks."""
        if cap is None:
            old = self._captures.get((f, constants))
            cap = Capture(f, constants or (old is not None and old.constants))
        with self._lock:
            if len(self._captures) > 4096:
                self._captures.clear()
            self._captures[(f, constants)] = cap
        return cap

    # ---- tracing with a cache per (function, signature, captured state)
    def prepare(self, f: Callable, args: tuple, kwargs: Mapping[str, Any] | None = None,
                constants: bool = False) -> tuple[TracedFunction, list[Any]]:
        """The trace of `f` for this call (cached or new) and its input values, in `in_names`
        order. `constants`: captured arrays become constants guarded by their contents."""
        kwargs = _kwargs(kwargs)
        leaves, spec = flatten_call(args, kwargs)
        sig = tuple([_leaf_key(x) for x in leaves])
        cap = self.capture(f, constants)
        ckey, captured, _ = cap.read()
        with self._lock:
            t = self._traces.get((f, spec, sig, cap.layout, ckey))
        if t is None:
            t, captured = self._trace(f, args, kwargs, spec, sig, constants)
        else:
            self._note_hit()
        return t, t.values(leaves, captured)

    def traced(self, f: Callable, args: tuple, kwargs: Mapping[str, Any] | None = None) -> TracedFunction:
        return self.prepare(f, args, kwargs)[0]

    def _slot(self, x: Any) -> Any:
        """A leaf for a slot whose dtype the graph fixes (a seed, cotangent, tangent or vector): a
        Python scalar stays weakly typed (`_slot_value`), anything else as `_arr` gives it."""
        t = type(x)
        return x if t is float or t is int or t is bool else self._arr(x)

    def _arr(self, x: Any) -> Any:
        """`_as_array` for this backend: a TensorRef only where a server resolves it."""
        a = _as_array(x)
        if not self.refs and type(a) is TensorRef:
            a.__array__()  # raises, saying how to use it
        return a

    def _trace(self, f: Callable, args: tuple, kwargs: dict[str, Any], spec: Any, sig: tuple,
               constants: bool) -> tuple[TracedFunction, list[Any]]:
        if not self.refs:  # each signature is traced once, so this is not on the hot path
            for x in tree_flatten((args, kwargs))[0]:
                if type(x) is TensorRef:
                    x.__array__()
        cap = self._rescan(f, constants)  # the functions it reaches may have been rebound
        ckey, captured, values = cap.read()
        arg_text = {n: _leaf_text(x) for n, x in _named_leaves(f, args, kwargs)}
        cap_text = cap.describe(values)
        why = self._why(f, spec, arg_text, cap_text)
        try:
            try:
                t = trace_function(f, args, kwargs, cap, values)
            except Exception as e:
                if cap.constants or not cap.has_constant_candidates(values):
                    raise
                # captured arrays met something a traced value cannot do (Python control flow,
                # a numpy function gradserve does not trace): constants, guarded by contents
                cap = Capture(f, constants=True)
                ckey, captured, values = cap.read()
                cap_text = cap.describe(values)
                try:
                    t = trace_function(f, args, kwargs, cap, values)
                except Exception as e2:  # an error of the function itself: the plain trace's
                    raise e2 from None
                self._rescan(f, constants, cap)  # only once constants did trace
                first = str(e).splitlines()[0] if str(e) else ""
                why += (f"; tracing its captured arrays failed ({type(e).__name__}: {first[:120]}), so they are "
                        "constants of the graph and a change of their contents retraces")
        finally:
            self._note_miss(why)
        with self._lock:
            if len(self._traces) > 4096:
                self._traces.clear()
            self._traces[(f, spec, sig, cap.layout, ckey)] = t
            self._last[f] = (spec, arg_text, cap_text)
        return t, captured

    def _why(self, f: Callable, spec: Any, arg_text: dict[str, str], cap_text: dict[str, str]) -> str:
        qual = getattr(f, "__qualname__", f)
        with self._lock:
            prev = self._last.get(f)
        if prev is None:
            return f"trace miss: first call of {qual}"
        if prev[0] != spec:
            return f"trace miss: argument structure of {qual} changed"
        parts = []
        old = prev[1]
        diff = ", ".join(f"{n}: {old.get(n)} -> {text}" for n, text in arg_text.items() if old.get(n) != text)
        if diff:
            parts.append(f"input signature of {qual} changed ({diff})")
        for where, text in cap_text.items():
            before = prev[2].get(where)
            if before is None:
                parts.append(f"{qual} now reads {where} ({text})")
            elif before != text:
                parts.append(f"{where} changed {before} -> {text} (read by {qual})")
        if not parts:
            parts.append(f"no trace of {qual} for these inputs (cleared or evicted)")
        return "trace miss: " + "; ".join(parts)

    def _note_hit(self) -> None:
        note = getattr(self.backend, "note_hit", None)
        if note:
            note()

    def _note_miss(self, why: str) -> None:
        note = getattr(self.backend, "note_miss", None)
        if note:
            note(why)

    @staticmethod
    def _groups(t: TracedFunction, selected: Sequence[tuple[str, Any]], what: str = "argnums") -> list[list[str]]:
        """The input names of each differentiated argument's array leaves."""
        out = []
        for label, value in selected:
            leaves = [n for n, x in flatten(value, label)[0] if _is_array_leaf(x)]
            for n in leaves:
                if t.graph.input(n).dtype not in FLOATS:
                    raise TypeError(f"cannot differentiate with respect to argument {n!r} of dtype "
                                    f"{t.graph.input(n).dtype}; pass floats, or leave it out of {what}")
            out.append(leaves)
        return out

    def _argnum_leaves_floats(self, t: TracedFunction, f: Callable, args: tuple) -> list[list[str]]:
        names = _param_names(f, len(args))
        return [[n for n, x in flatten(a, name)[0] if _is_array_leaf(x) and t.graph.input(n).dtype in FLOATS]
                for name, a in zip(names, args, strict=True)]

    def _outputs(self, t: TracedFunction, values: dict[str, Any]) -> Any:
        return unflatten(t.out_treedef, [values[n] for n in t.out_names])

    # ---- public transforms
    def grad(self, f: Callable, argnums: int | Sequence[int] | None = None, has_aux: bool = False,
             batch_axes: Mapping[str, int] | None = None, argnames: str | Sequence[str] | None = None) -> Callable:
        g = self._value_and_grad(f, argnums, has_aux, batch_axes, argnames, grad_only=True)
        register_transform(g, f, lambda h: self.grad(h, argnums, has_aux, batch_axes, argnames))
        return g

    def value_and_grad(self, f: Callable, argnums: int | Sequence[int] | None = None, has_aux: bool = False,
                       batch_axes: Mapping[str, int] | None = None,
                       argnames: str | Sequence[str] | None = None) -> Callable:
        vg = self._value_and_grad(f, argnums, has_aux, batch_axes, argnames, grad_only=False)
        register_transform(vg, f, lambda h: self.value_and_grad(h, argnums, has_aux, batch_axes, argnames))
        return vg

    def _value_and_grad(self, f: Callable, argnums: int | Sequence[int] | None, has_aux: bool,
                        batch_axes: Mapping[str, int] | None, argnames: str | Sequence[str] | None,
                        grad_only: bool) -> Callable:
        """`value_and_grad`'s function, or `grad`'s (`grad_only`: the gradient, or `(gradient,
        aux)`). Its cache is keyed by the call's structure and signature and the captured state,
        read at every call; a hit runs the compiled call with nothing re-derived."""
        sel = _Selection(argnums, argnames)
        compiled: dict[Any, Callable[[Sequence, list], Any]] = {}
        captures, capture_key = self._captures, (f, False)  # `self.capture(f)`, inline
        note_hit = getattr(self.backend, "note_hit", None)

        @functools.wraps(f)
        def vg(*args: Any, **kwargs: Any) -> Any:
            if kwargs:
                kwargs = _kwargs(kwargs)
            plain = _call_key(args, kwargs)
            if plain is not None:  # dicts, lists, tuples of numbers and numpy arrays: no optree
                leaves, structure = plain
                sig: tuple | None = None
            else:
                leaves, structure = flatten_call(args, kwargs)
                sig = tuple([_leaf_key(x) for x in leaves])
                leaves = [_value(x) for x in leaves]  # arrays as fed (sig does not tell a tensor from an array)
            cap = captures.get(capture_key)
            if cap is None:
                cap = self._rescan(f, False)
            ckey, captured, _ = cap.read()
            call = compiled.get((structure, sig, cap.layout, ckey))
            if call is None:
                call = self._compile_value_and_grad(f, args, kwargs, sel, has_aux, batch_axes, grad_only)
                cap = self.capture(f)  # tracing rescans it
                ckey, captured, _ = cap.read()
                if len(compiled) > 256:
                    compiled.clear()
                compiled[(structure, sig, cap.layout, ckey)] = call
            elif note_hit is not None:
                note_hit()
            return call(leaves, captured)

        return vg

    def _compile_value_and_grad(self, f: Callable, args: tuple, kwargs: dict[str, Any], sel: _Selection, has_aux: bool,
                                batch_axes: Mapping[str, int] | None, grad_only: bool) -> Callable[[Sequence, list], Any]:
        """Trace once for this signature and return the steady-state call: leaves (as fed, but
        for Python numbers) and captured arrays in, plan run, pytrees out, with no re-validation
        (the signature key guarantees the types)."""
        t, _ = self.prepare(f, args, kwargs)
        loss = t.out_names[0]
        dtype, shape = t.graph.aval(dict(t.graph.outputs)[loss])
        if (not has_aux and len(t.out_names) != 1) or dtype not in FLOATS or shape != ():
            raise TypeError(f"grad needs a function with one scalar float output; "
                            f"{getattr(f, '__name__', 'f')} returned {', '.join(t.out_names)} "
                            f"({type_str(dtype, shape)}{' ...' if len(t.out_names) > 1 else ''}); "
                            "use vjp or jacobian for other outputs, or has_aux=True")
        selected = sel.resolve(f, args, kwargs)
        groups = self._groups(t, selected, "argnames" if sel.by_name and not sel.both else "argnums")
        wrt = [n for grp in groups for n in grp]
        shapes = [shaped_like(value, label) for label, value in selected]
        axes = self._batch_axes(t, f, args, kwargs, batch_axes)
        grad_plan = getattr(self.backend, "grad_plan", None)
        if axes:
            analyze(t.graph, axes)  # refuse, naming the node, a graph that mixes examples
        extra = {"batch_axes": axes} if axes else {}
        example = flatten_call(args, kwargs)[0]  # this call's leaves, which the signature describes
        if grad_plan is not None:
            plan = grad_plan(t.graph, wrt, loss)
            feed = _feeder(t, example, [t.in_names.index(name) for name, _ in plan.inputs])
            grad_names = vjp_names(t.graph, wrt, [loss]).grad
            return _plan_call(_held_weakly(plan, lambda: grad_plan(t.graph, wrt, loss), self.backend.touch), feed, t,
                              sel, selected, groups, grad_names, has_aux, grad_only)

        feed = _feeder(t, example, range(len(t.in_names)))

        def finish(outs: dict[str, Any], grads: dict[str, Any]) -> Any:
            per_arg = [like(grads) if grp else None for like, grp in zip(shapes, groups, strict=True)]
            value = unflatten(t.out_treedef, [outs[n] for n in t.out_names])
            if grad_only:
                return (sel.pack(per_arg), value[1]) if has_aux else sel.pack(per_arg)
            return value, sel.pack(per_arg)

        if getattr(self.backend, "deferred", False):
            # an awaitable backend (the asyncio session): the request is built now, from the
            # values of now, and the call's value is the awaitable of its finished result
            def call_deferred(leaves: Sequence, captured: list) -> Any:
                named = dict(zip(t.in_names, feed(leaves, captured), strict=True))
                return _finished(self.backend.vjp_outputs(t.graph, named, wrt, loss, t.out_names[1:], axes), finish)
            return call_deferred

        def run(values: list[Any]) -> tuple[dict, dict]:
            named = dict(zip(t.in_names, values, strict=True))
            outs, grads = self.backend.vjp(t.graph, named, wrt, outputs=[loss], **extra)
            if len(t.out_names) > 1:
                outs = {**outs, **self.backend.evaluate(t.graph, named, t.out_names[1:])}
            return outs, grads

        def call(leaves: Sequence, captured: list) -> Any:
            return finish(*run(feed(leaves, captured)))

        return call

    @staticmethod
    def _batch_axes(t: TracedFunction, f: Callable, args: tuple, kwargs: Mapping[str, Any],
                    batch_axes: Mapping[str, int] | None) -> dict[str, int]:
        """Batch axes by input name; a parameter's name applies to every array leaf of it."""
        if not batch_axes:
            return {}
        names = _param_names(f, len(args))
        out: dict[str, int] = {}
        for key, axis in batch_axes.items():
            if key in t.in_names:
                out[key] = int(axis)
            elif key in names or key in kwargs:
                value = kwargs[key] if key in kwargs else args[names.index(key)]
                leaves = [n for n, x in flatten(value, key)[0] if _is_array_leaf(x)]
                out.update({n: int(axis) for n in leaves})
            else:
                raise ValueError(f"batch_axes names {key!r}, which is neither a parameter {names + list(kwargs)} "
                                 f"nor an input {t.in_names}")
        return out

    def vjp(self, f: Callable, /, *primals: Any, **kwargs: Any) -> tuple[Any, Callable]:
        t, values = self.prepare(f, primals, kwargs)
        feed = dict(zip(t.in_names, values, strict=True))
        groups = self._argnum_leaves_floats(t, f, primals)
        out = self._outputs(t, self.backend.evaluate(t.graph, feed))
        wrt = [n for grp in groups for n in grp]
        float_outs = [n for n in t.out_names if t.graph.aval(dict(t.graph.outputs)[n])[0] in FLOATS]
        shapes = [shaped_like(p, name) for name, p in zip(_param_names(f, len(primals)), primals, strict=True)]

        def vjp_fn(cotangent: Any) -> tuple:
            cts = tree_flatten(cotangent)[0] if not t.out_treedef.is_leaf() else [cotangent]
            if len(cts) != len(t.out_names):
                raise ValueError(f"cotangent has {len(cts)} leaves for {len(t.out_names)} outputs {t.out_names}")
            seeds = {n: self._slot(c) for n, c in zip(t.out_names, cts, strict=True) if n in float_outs}
            _, grads = self.backend.vjp(t.graph, feed, wrt, seeds=seeds, outputs=list(seeds))
            return tuple(like(grads) if grp else None for like, grp in zip(shapes, groups, strict=True))

        return out, vjp_fn

    def jvp(self, f: Callable, primals: Sequence[Any], tangents: Sequence[Any], /, **kwargs: Any) -> tuple[Any, Any]:
        primals, tangents = tuple(primals), tuple(tangents)
        if len(primals) != len(tangents):
            raise ValueError(f"jvp got {len(primals)} primals but {len(tangents)} tangents")
        t, values = self.prepare(f, primals, kwargs)
        groups = self._argnum_leaves_floats(t, f, primals)
        tans = {}
        for grp, tan in zip(groups, tangents, strict=True):
            tleaves = tree_flatten(tan)[0]
            if len(tleaves) != len(grp):
                raise ValueError(f"tangent {tan!r} does not match the float leaves {grp} of its primal")
            tans.update({n: self._slot(x) for n, x in zip(grp, tleaves, strict=True)})
        outs, touts = self.backend.jvp(t.graph, dict(zip(t.in_names, values, strict=True)), tans)
        tout = {n: touts.get(n, np.zeros_like(outs[n]) if not isinstance(outs[n], Var) else outs[n] * 0)
                for n in t.out_names}
        return self._outputs(t, outs), self._outputs(t, tout)

    def jacobian(self, f: Callable, argnums: int | Sequence[int] | None = None,
                 argnames: str | Sequence[str] | None = None) -> Callable:
        sel = _Selection(argnums, argnames)

        @functools.wraps(f)
        def jac(*args: Any, **kwargs: Any) -> Any:
            kwargs = _kwargs(kwargs)
            t, values = self.prepare(f, args, kwargs)
            selected = sel.resolve(f, args, kwargs)
            groups = self._groups(t, selected)
            wrt = [n for grp in groups for n in grp]
            res = self.backend.jacobian(t.graph, dict(zip(t.in_names, values, strict=True)), wrt, t.out_names)

            shapes = [shaped_like(value, label) for label, value in selected]

            def per_output(o: str) -> Any:
                return sel.pack([like({n: res[(o, n)] for n in grp}) for like, grp in zip(shapes, groups, strict=True)])

            return unflatten(t.out_treedef, [per_output(o) for o in t.out_names])

        register_transform(jac, f, lambda h: self.jacobian(h, argnums, argnames))
        return jac

    def hessian(self, f: Callable, argnums: int | Sequence[int] | None = None,
                argnames: str | Sequence[str] | None = None) -> Callable:
        sel = _Selection(argnums, argnames)

        @functools.wraps(f)
        def hess(*args: Any, **kwargs: Any) -> Any:
            kwargs = _kwargs(kwargs)
            t, values = self.prepare(f, args, kwargs)
            if len(t.out_names) != 1 or t.graph.aval(t.graph.outputs[0][1])[1] != ():
                raise TypeError("hessian needs a function with one scalar float output")
            selected = sel.resolve(f, args, kwargs)
            groups = self._groups(t, selected)
            for (label, _), grp in zip(selected, groups, strict=True):
                if len(grp) != 1:
                    raise TypeError(f"hessian argument {label!r} must be a single array, not a pytree of {len(grp)} leaves")
            wrt = [grp[0] for grp in groups]
            res = self.backend.hessian(t.graph, dict(zip(t.in_names, values, strict=True)), wrt, t.out_names[0])
            if len(wrt) == 1 and not (sel.nums_multi or sel.names_multi or sel.both):
                return res[(wrt[0], wrt[0])]
            rows = [tuple(res[(a, b)] for b in wrt) for a in wrt]
            if not sel.both:
                return tuple(rows)
            k = len(sel.nums)  # (by argnums, by argnames) of the rows, each row split the same way
            split = [(r[:k] if sel.nums_multi else r[0], r[k:] if sel.names_multi else r[k]) for r in rows]
            nums = tuple(split[:k]) if sel.nums_multi else split[0]
            names = tuple(split[k:]) if sel.names_multi else split[k]
            return nums, names

        register_transform(hess, f, lambda h: self.hessian(h, argnums, argnames))
        return hess

    def hvp(self, f: Callable, primals: Sequence[Any], vectors: Sequence[Any], /, **kwargs: Any) -> tuple:
        """Hessian-vector product of scalar `f` at `primals` along `vectors` (forward over reverse)."""
        primals, vectors = tuple(primals), tuple(vectors)
        t, values = self.prepare(f, primals, kwargs)
        groups = self._argnum_leaves_floats(t, f, primals)
        wrt = [n for grp in groups for n in grp]
        vecs = {}
        for grp, v in zip(groups, vectors, strict=True):
            vecs.update({n: self._slot(x) for n, x in zip(grp, tree_flatten(v)[0], strict=True)})
        res = self.backend.hvp(t.graph, dict(zip(t.in_names, values, strict=True)), wrt, t.out_names[0], vecs)
        return tuple(shaped_like(p, name)(res) if grp else None
                     for name, p, grp in zip(_param_names(f, len(primals)), primals, groups, strict=True))

    def trace(self, f: Callable, /, *args: Any, **kwargs: Any) -> Graph:
        return trace_function(f, args, kwargs).graph


__all__ = ["Functional", "Traced", "flatten", "register_pytree_node", "shaped_like", "trace_function", "unflatten"]
