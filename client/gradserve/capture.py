"""Captured state: what a traced function reads besides its arguments, read at every call.

A function is scanned once (again after any trace miss) for its closure cells, the globals its
code names (`LOAD_GLOBAL`, in nested code objects too) and its default argument values; the
functions it reaches through them (user code, not installed packages or gradserve itself;
bound methods, `functools.partial` and gradserve's own transforms such as `gs.grad(h)` are seen
through) are scanned the same way, up to `MAX_FUNCTIONS` of them. Each such place is a source:

- arrays (numpy arrays and scalars, traced values, `gs.tensor`s), alone or as leaves of a
  container (dict, list, tuple, namedtuple, dataclass, registered node), are inputs of the graph,
  named `<closure>.W`, `<global>.W`, `<default>.W`, `<self>.W` (plus the path into a container:
  `<global>.params.w1`; a helper's closure is `<closure>.helper.W`, another module's global
  `<global:module>.W`; a plain object's attribute `<self>.W`, `<global>.model.W`). Names
  beginning with `<` cannot be a parameter's. Their values are read and sent at every call;
  only a changed shape or dtype retraces.
- Python scalars, strings, bytes and None are guards: the trace keeps the value it saw, and a
  changed value retraces ("trace miss: global 'scale' changed 1.0 -> 10").
- anything else (modules, functions, classes, other objects) is guarded by identity: rebinding
  the name retraces. A plain object (of a class of user code, no container) or a user module
  is looked into: its attributes that the reading code or the class's methods name are sources
  as above. What other objects hold is read at trace time and is not guarded.

To trace, gradserve calls a copy of the function whose captured arrays are traced values: new
closure cells, a copy of its module's globals where a global is replaced, a shallow copy of a
plain object whose attribute is; what the function assigns to them while tracing (a `global`
counter, say) is carried back to the originals afterwards. If tracing with traced captured
arrays fails (they met Python control flow, or a numpy function gradserve does not trace), the
function is traced again with them as constants, guarded by their contents instead: still
never stale, but a changed value then retraces. `constants=True` asks for that mode directly.
"""

from __future__ import annotations

import dis
import functools
import hashlib
import operator
import os
import site
import sys
import sysconfig
import types
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

import gradserve_engine
from gradserve_engine.ir import Builder, Var, type_str
from gradserve_engine.ops.core import DTYPES, dtype_name

from .pytree import flatten, tree_flatten, unflatten

MAX_FUNCTIONS = 64
MAX_SOURCES = 1024
_MISSING = type("_Missing", (), {"__repr__": lambda self: "<unbound>"})()
_VALUE_TYPES = frozenset({int, float, bool, str, bytes, complex, type(None)})
_OPAQUE_TYPES = frozenset({types.FunctionType, types.BuiltinFunctionType, types.MethodType, types.ModuleType, type,
                           functools.partial, types.BuiltinMethodType, types.CodeType, type(_MISSING)})
_TRANSFORMS: weakref.WeakKeyDictionary[Callable, tuple[Callable, Callable]] = weakref.WeakKeyDictionary()


def register_transform(wrapper: Callable, inner: Callable, rewrap: Callable[[Callable], Callable]) -> None:
    """`wrapper` is a gradserve transform of `inner`; `rewrap(g)` makes the same transform of `g`."""
    _TRANSFORMS[wrapper] = (inner, rewrap)


# ---------------------------------------------------------------- what code reads


@functools.lru_cache(maxsize=4096)
def _global_names(code: types.CodeType) -> tuple[str, ...]:
    names: dict[str, None] = {}
    stack = [code]
    while stack:
        c = stack.pop()
        for ins in dis.get_instructions(c):
            if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME"):
                names[ins.argval] = None
        stack.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    return tuple(names)


@functools.lru_cache(maxsize=4096)
def _code_names(code: types.CodeType) -> frozenset[str]:
    """Every name the code (and code nested in it) uses: globals, attributes, methods."""
    names: set[str] = set()
    stack = [code]
    while stack:
        c = stack.pop()
        names.update(c.co_names)
        stack.extend(k for k in c.co_consts if isinstance(k, types.CodeType))
    return frozenset(names)


@functools.lru_cache(maxsize=1024)
def _class_names(cls: type) -> frozenset[str]:
    """The names the methods (and properties) of a user class use."""
    names: set[str] = set()
    for klass in cls.__mro__:
        for member in vars(klass).values():
            fn = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
            if isinstance(fn, types.FunctionType) and _is_user_code(fn.__code__.co_filename):
                names |= _code_names(fn.__code__)
    return frozenset(names)


def _library_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {paths.get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")}
    try:
        dirs.update(site.getsitepackages())
        dirs.add(site.getusersitepackages())
    except AttributeError:  # some virtualenvs' site module
        pass
    dirs.add(os.path.dirname(os.path.abspath(__file__)))
    dirs.add(os.path.dirname(os.path.abspath(gradserve_engine.__file__)))
    return tuple(os.path.join(os.path.realpath(d), "") for d in dirs if d)


_LIBRARY = _library_dirs()


@functools.lru_cache(maxsize=4096)
def _is_user_code(filename: str) -> bool:
    if filename.startswith("<frozen"):
        return False
    return not os.path.realpath(filename).startswith(_LIBRARY)


@functools.lru_cache(maxsize=1024)
def _plain_class(cls: type) -> bool:
    module = sys.modules.get(cls.__module__)
    file = getattr(module, "__file__", None)
    return cls.__new__ is object.__new__ and (file is None or _is_user_code(file))


def _plain(obj: Any) -> str | None:
    """"instance" for an object of a user class whose attributes gradserve reads (a plain one:
    no container, array or value), "module" for a module of user code, else None."""
    t: type = type(obj)  # `type`, not mypy's `type[Any]`: the lru_cache'd helpers take a Hashable
    if t is types.ModuleType:
        file = getattr(obj, "__file__", None)
        return "module" if file is not None and _is_user_code(file) else None
    if t in _VALUE_TYPES or t in _OPAQUE_TYPES or _is_array(obj) or not hasattr(obj, "__dict__"):
        return None
    if not _plain_class(t) or not tree_flatten(obj)[1].is_leaf():
        return None
    return "instance"


def _attr_getter(obj: Any, name: str) -> Callable[[], Any]:
    return lambda: vars(obj).get(name, _MISSING)


# ---------------------------------------------------------------- sources and the functions that read them


class Source:
    """One place a captured value is read from: `get()` reads it; `fast()` too, quicker, but may
    raise ValueError where `get` gives `_MISSING` (an empty closure cell)."""

    __slots__ = ("attrs", "fast", "get", "label", "node", "where")

    def __init__(self, label: str, where: str, get: Callable[[], Any], fast: Callable[[], Any] | None = None):
        self.label, self.where, self.get = label, where, get
        self.fast = get if fast is None else fast
        self.node: Node | None = None  # the callable it holds, when it is one gradserve looks into
        self.attrs: list[tuple[str, Source]] = []  # attributes read of the plain object it holds


class Node:
    """A callable gradserve looks into: a function, a bound method, a partial or a transform."""

    __slots__ = ("cells", "child", "defaults", "globals", "kind", "kwdefaults", "obj", "self_source")

    def __init__(self, kind: str, obj: Any):
        self.kind, self.obj = kind, obj
        self.child: Node | None = None
        self.cells: list[Source | None] = []
        self.globals: list[tuple[str, Source]] = []
        self.defaults: list[Source] = []
        self.kwdefaults: list[tuple[str, Source]] = []
        self.self_source: Source | None = None

    def sources(self) -> list[Source]:
        out = [s for s in self.cells if s is not None] + [s for _, s in self.globals] + self.defaults
        out += [s for _, s in self.kwdefaults]
        if self.self_source is not None:
            out.append(self.self_source)
        return out


_CELL_CONTENTS = operator.attrgetter("cell_contents")


def _cell_getter(cell: types.CellType) -> Callable[[], Any]:
    def get() -> Any:
        try:
            return cell.cell_contents
        except ValueError:
            return _MISSING
    return get


def _default_getter(fn: types.FunctionType, i: int) -> Callable[[], Any]:
    def get() -> Any:
        d = fn.__defaults__ or ()
        return d[i] if i < len(d) else _MISSING
    return get


def _kwdefault_getter(fn: types.FunctionType, name: str) -> Callable[[], Any]:
    return lambda: (fn.__kwdefaults__ or {}).get(name, _MISSING)


class Capture:
    """The sources of one function (a fresh scan) and how to read, key and substitute them."""

    def __init__(self, f: Callable, constants: bool = False):
        self.f, self.constants = f, constants
        self.sources: list[Source] = []
        self._by_place: dict[Any, Source] = {}
        self._labels: set[str] = set()
        self._nodes: dict[int, Node | None] = {}
        self._keep: list[Any] = []  # what the places' ids refer to, kept alive
        self._main_globals: dict | None = None
        self._expanding: set[int] = set()
        self.top = self._node(f, main=True)
        self.layout = tuple(s.label for s in self.sources)
        self._fast = tuple(s.fast for s in self.sources)

    # ---- scanning
    def _source(self, place: Any, label: str, where: str, get: Callable[[], Any], owner: Any,
                names: frozenset[str] = frozenset(), fast: Callable[[], Any] | None = None) -> Source:
        """The source at `place` (one per place); `names`: the names the reading code uses, for
        the attributes of a plain object it holds."""
        s = self._by_place.get(place)
        if s is not None:
            if names:
                self._attributes(s, s.get(), names)
            return s
        base, k = label, 2
        while label in self._labels:
            label, k = f"{base}#{k}", k + 1
        s = Source(label, where, get, fast)
        self._by_place[place] = s
        self._labels.add(label)
        self._keep.append(owner)
        self.sources.append(s)
        value = get()
        if callable(value) and len(self._nodes) < MAX_FUNCTIONS:
            s.node = self._node(value)
        if names:
            self._attributes(s, value, names)
        return s

    def _attributes(self, s: Source, obj: Any, names: frozenset[str]) -> None:
        """Sources for the attributes of a plain object (of a class or module of user code) that
        the reading code, or its class's methods, may read: `<global>.model.W`, `<self>.W`."""
        kind = _plain(obj)
        if kind is None or len(self.sources) >= MAX_SOURCES or id(s) in self._expanding:
            return
        self._expanding.add(id(s))  # an object that holds itself ends here
        cls: type = type(obj)
        wanted = names | _class_names(cls) if kind == "instance" else names
        have = {name for name, _ in s.attrs}
        for name in list(vars(obj)):
            if name in wanted and name not in have and not name.startswith("__"):
                sub = self._source(("attr", id(obj), name), f"{s.label}.{name}", f"attribute '{name}' of {s.where}",
                                   _attr_getter(obj, name), obj, names)
                s.attrs.append((name, sub))
        self._expanding.discard(id(s))

    def _node(self, value: Any, main: bool = False) -> Node | None:
        key = id(value)
        if key in self._nodes:
            return self._nodes[key]
        self._nodes[key] = None  # cycles end here
        self._keep.append(value)
        node = None
        if isinstance(value, types.FunctionType):
            if value in _TRANSFORMS:
                inner, _ = _TRANSFORMS[value]
                node = Node("transform", value)
                self._nodes[key] = node
                node.child = self._node(inner, main)
            elif _is_user_code(value.__code__.co_filename):
                node = Node("function", value)
                self._nodes[key] = node
                self._scan_function(node, value, main)
        elif isinstance(value, types.MethodType) and isinstance(value.__func__, types.FunctionType):
            node = Node("method", value)
            self._nodes[key] = node
            child = self._node(value.__func__, main)
            if child is not None and child.kind == "function":
                node.child = child
                obj = value.__self__
                node.self_source = self._source(("self", id(obj)), "<self>" if main else f"<self>.{value.__name__}",
                                                "self" if main else f"self of {value.__qualname__}", lambda: obj, obj,
                                                _code_names(value.__func__.__code__))
            else:
                node = self._nodes[key] = None
        elif isinstance(value, functools.partial):
            child = self._node(value.func, main)
            if child is not None:
                node = Node("partial", value)
                node.child = child
                self._nodes[key] = node
        return node

    def _scan_function(self, node: Node, fn: types.FunctionType, main: bool) -> None:
        code = fn.__code__
        if main and self._main_globals is None:
            self._main_globals = fn.__globals__
        tag = "" if main else f".{fn.__name__}"
        of = "" if main else f" of {fn.__qualname__}"
        names = _code_names(code)
        for name, cell in zip(code.co_freevars, fn.__closure__ or (), strict=True):
            node.cells.append(self._source(("cell", id(cell)), f"<closure>{tag}.{name}", f"closure '{name}'{of}",
                                           _cell_getter(cell), cell, names, functools.partial(_CELL_CONTENTS, cell)))
        g = fn.__globals__
        for name in _global_names(code):
            if g is self._main_globals:
                label, where = f"<global>.{name}", f"global '{name}'"
            else:
                module = g.get("__name__", "?")
                label, where = f"<global:{module}>.{name}", f"global '{name}' of {module}"
            node.globals.append((name, self._source(("global", id(g), name), label, where,
                                                    functools.partial(g.get, name, _MISSING), g, names)))
        params = code.co_varnames[:code.co_argcount]
        defaults = fn.__defaults__ or ()
        for i in range(len(defaults)):
            name = params[len(params) - len(defaults) + i]
            node.defaults.append(self._source(("default", id(fn), i), f"<default>{tag}.{name}",
                                              f"default of '{name}'{of}", _default_getter(fn, i), fn))
        for name in fn.__kwdefaults__ or {}:
            node.kwdefaults.append((name, self._source(("kwdefault", id(fn), name), f"<default>{tag}.{name}",
                                                       f"default of '{name}'{of}", _kwdefault_getter(fn, name), fn)))

    # ---- reading, every call
    def read(self) -> tuple[tuple, list[Any], list[Any]]:
        """`(key, arrays, values)`: a hashable key of the captured state (shapes and dtypes of the
        arrays, values of the guards, identities of the rest), the arrays to feed, in input
        order, and the values read (kept alive with a trace: the key holds their ids)."""
        feed: list[Any] = []
        try:
            values = [get() for get in self._fast]
        except ValueError:  # an empty closure cell
            values = [s.get() for s in self.sources]
        if not values:
            return (), feed, values
        constants = self.constants
        key: list[Any] = []
        for v in values:  # _value_key, with its common cases first and inline: every call reads this
            t = type(v)
            if t in _OPAQUE_TYPES:
                key.append(("id", id(v)))
            elif t in _VALUE_TYPES:
                key.append((t, v))
            elif t is np.ndarray and not constants and dtype_name(v.dtype) in DTYPES:
                feed.append(v)
                key.append((v.dtype, v.shape))
            else:
                key.append(_value_key(v, feed, constants))
        return tuple(key), feed, values

    def describe(self, values: list[Any]) -> dict[str, str]:
        """What each source held, for the miss reasons."""
        return {s.where: _describe(v, self.constants) for s, v in zip(self.sources, values, strict=True)}

    # ---- tracing
    def substitute(self, b: Builder, values: list[Any]) -> tuple[Callable, list[tuple[int, str]], Callable[[], None]]:
        """The function to trace, reading traced values for its captured arrays (declared as
        inputs of `b`), `(index into read()'s arrays, input name)` for each input, and `done()`
        to call after tracing: it carries what the function assigned to the copies (a global,
        a nonlocal, an attribute) back to the originals."""
        inputs: list[tuple[int, str]] = []
        subs: dict[int, Any] = {}  # id(source) -> its substitute
        k = 0
        for s, v in zip(self.sources, values, strict=True):
            named = _input_leaves(v, s.label, self.constants)
            if named is None:
                continue
            leaves, spec, which = named
            new = list(leaves)
            for i, name in which:
                a = _array(leaves[i])
                new[i] = b.input(name, dtype_name(a.dtype) if not isinstance(a, Var) else a.ir_dtype, tuple(a.shape))
                inputs.append((k, name))
                k += 1
            subs[id(s)] = new[0] if spec is None else unflatten(spec, new)
        if self.top is None or not subs:
            return self.f, inputs, _nothing
        rebuild = _Rebuild(self, subs)
        return rebuild.callable(self.top), inputs, rebuild.write_back

    def has_constant_candidates(self, values: list[Any]) -> bool:
        """Whether tracing with constants would differ: a captured array that is not traced."""
        feed: list[Any] = []
        for v in values:
            _value_key(v, feed, False)
        return any(not isinstance(a, Var) for a in feed)


def _nothing() -> None:
    pass


class _Rebuild:
    """Copies of the scanned callables whose captured values are substituted."""

    def __init__(self, cap: Capture, subs: dict[int, Any]):
        self.cap, self.subs = cap, subs
        self.memo: dict[int, Any] = {}
        self.globals: dict[int, dict] = {}
        self.cells: dict[int, types.CellType] = {}
        self.dicts: list[tuple[dict, dict, dict[str, Any], set[str]]] = []  # (original, copy, what was put, keys)
        self.new_cells: list[tuple[types.CellType, types.CellType, Any]] = []  # (original, copy, what was put)
        self.needs: set[int] = set()  # ids of the callables to copy
        self.substituted: set[int] = set()  # ids of the sources whose value is replaced
        nodes = [n for n in cap._nodes.values() if n is not None]
        changed = True
        while changed:  # a callable is copied when a value it reads is replaced; a value is replaced
            changed = False  # when it has traced arrays, is a copied callable, or an object with such attributes
            for s in cap.sources:
                if id(s) not in self.substituted and (id(s) in subs or (s.node is not None and id(s.node) in self.needs)
                                                      or any(id(a) in self.substituted for _, a in s.attrs)):
                    self.substituted.add(id(s))
                    changed = True
            for n in nodes:
                if id(n) not in self.needs and (any(id(s) in self.substituted for s in n.sources())
                                                or (n.child is not None and id(n.child) in self.needs)):
                    self.needs.add(id(n))
                    changed = True

    def _substituted(self, s: Source) -> bool:
        return id(s) in self.substituted

    def value(self, s: Source) -> Any:
        if id(s) in self.subs:
            return self.subs[id(s)]
        if s.node is not None and id(s.node) in self.needs:
            return self.callable(s.node)
        if id(s) in self.substituted and s.attrs:
            return self._clone(s)
        return s.get()

    def _clone(self, s: Source) -> Any:
        """A shallow copy of the plain object `s` holds, with its substituted attributes."""
        if id(s) in self.memo:
            return self.memo[id(s)]
        obj = s.get()
        clone = types.ModuleType(obj.__name__) if isinstance(obj, types.ModuleType) else object.__new__(type(obj))
        self.memo[id(s)] = clone
        vars(clone).update(vars(obj))
        put = {}
        for name, a in s.attrs:
            if self._substituted(a):
                vars(clone)[name] = put[name] = self.value(a)
        self.dicts.append((vars(obj), vars(clone), put, set(vars(clone))))
        return clone

    def write_back(self) -> None:
        """Carry the assignments the traced function made to the copies over to the originals."""
        for original, copy, put, keys in self.dicts:
            for k, v in list(copy.items()):
                if (v is not put[k]) if k in put else (original.get(k, _MISSING) is not v):
                    original[k] = v
            for k in keys - set(copy):
                original.pop(k, None)
        for cell, copied, was in self.new_cells:
            try:
                v = copied.cell_contents
            except ValueError:
                continue
            if v is not was:
                cell.cell_contents = v

    def callable(self, node: Node) -> Any:
        if id(node) not in self.needs:
            return node.obj
        if id(node) in self.memo:
            return self.memo[id(node)]
        if node.kind == "function":
            return self._function(node)
        # a method, partial or transform is needed only through what its child reads (a method's
        # `self` too), so it has a child; a method always has its `self`
        assert node.child is not None
        self.memo[id(node)] = node.obj  # a cycle through a method or partial: the original
        child = self.callable(node.child)
        out: Callable[..., Any]
        if node.kind == "method":
            assert node.self_source is not None
            out = types.MethodType(child, self.value(node.self_source))
        elif node.kind == "partial":
            p = node.obj
            out = functools.partial(child, *p.args, **p.keywords)
        else:
            out = _TRANSFORMS[node.obj][1](child)
        self.memo[id(node)] = out
        return out

    def _function(self, node: Node) -> types.FunctionType:
        fn = node.obj
        g = original = fn.__globals__
        fill_globals = False
        if any(self._substituted(s) for _, s in node.globals):
            if id(g) not in self.globals:
                self.globals[id(g)] = dict(g)
                fill_globals = True
            g = self.globals[id(g)]
        closure = []
        fill = []
        for cell, s in zip(fn.__closure__ or (), node.cells, strict=True):
            if s is not None and self._substituted(s):
                if id(cell) not in self.cells:
                    self.cells[id(cell)] = types.CellType()
                    fill.append((cell, self.cells[id(cell)], s))
                cell = self.cells[id(cell)]
            closure.append(cell)
        new = types.FunctionType(fn.__code__, g, fn.__name__, fn.__defaults__, tuple(closure) if fn.__closure__ else None)
        new.__kwdefaults__ = dict(fn.__kwdefaults__) if fn.__kwdefaults__ else None
        new.__dict__.update(fn.__dict__)
        new.__qualname__, new.__module__, new.__doc__ = fn.__qualname__, fn.__module__, fn.__doc__
        self.memo[id(node)] = new  # before filling: the values may be copies that read this one
        if fill_globals:
            self._fill_globals(original)
        for original, cell, s in fill:
            cell.cell_contents = self.value(s)
            self.new_cells.append((original, cell, cell.cell_contents))
        if node.defaults:
            new.__defaults__ = tuple(self.value(s) for s in node.defaults)
        if node.kwdefaults:
            kwdefaults = dict(fn.__kwdefaults__ or {})
            for name, s in node.kwdefaults:
                kwdefaults[name] = self.value(s)
            new.__kwdefaults__ = kwdefaults
        return new

    def _fill_globals(self, g: dict) -> None:
        copy = self.globals[id(g)]
        put: dict[str, Any] = {}
        for n in self.cap._nodes.values():
            if n is None or n.kind != "function" or n.obj.__globals__ is not g:
                continue
            for name, s in n.globals:
                if self._substituted(s):
                    copy[name] = put[name] = self.value(s)
        self.dicts.append((g, copy, put, set(copy)))


# ---------------------------------------------------------------- values


def _array(x: Any) -> Any:
    if hasattr(type(x), "__gradserve_array__"):
        return x.__gradserve_array__()
    return x


def _supported(a: Any) -> bool:
    return isinstance(a, Var) or dtype_name(a.dtype) in DTYPES


def _digest(a: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=16).hexdigest()


def _is_array(v: Any) -> bool:
    return isinstance(v, (np.ndarray, Var, np.generic)) or hasattr(type(v), "__gradserve_array__")


def _value_key(v: Any, feed: list[Any], constants: bool) -> Any:
    t = type(v)
    if t in _VALUE_TYPES:
        return (t, v)
    if t in _OPAQUE_TYPES:
        return ("id", id(v))
    if _is_array(v):
        a = _array(v)
        if not _supported(a):
            return ("id", id(v))
        if isinstance(a, Var):
            feed.append(a)
            return (Var, a.ir_dtype, a.shape)
        if constants:
            return ("const", a.dtype, a.shape, _digest(a))
        feed.append(a)
        return (a.dtype, a.shape)
    leaves, spec = tree_flatten(v)
    if spec.is_leaf():
        return ("id", id(v))
    return (spec, tuple(_value_key(x, feed, constants) for x in leaves))


def _input_leaves(v: Any, label: str, constants: bool) -> tuple[list[Any], Any, list[tuple[int, str]]] | None:
    """The leaves of `v`, its structure (None for a lone array) and `(index, input name)` of the
    leaves that are inputs; None when nothing in `v` is."""
    def is_input(x: Any) -> bool:
        if not _is_array(x):
            return False
        a = _array(x)
        return _supported(a) and (isinstance(a, Var) or not constants)

    t = type(v)
    if t in _VALUE_TYPES or t in _OPAQUE_TYPES:
        return None
    if _is_array(v):
        return ([v], None, [(0, label)]) if is_input(v) else None
    named, spec = flatten(v, label)
    if spec.is_leaf():
        return None
    which = [(i, name) for i, (name, x) in enumerate(named) if is_input(x)]
    return ([x for _, x in named], spec, which) if which else None


def _describe(v: Any, constants: bool) -> str:
    t = type(v)
    if t in _VALUE_TYPES:
        text = repr(v)
        return text if len(text) <= 60 else text[:57] + "..."
    if t in _OPAQUE_TYPES:
        return repr(v)
    if _is_array(v):
        a = _array(v)
        if not _supported(a):
            return f"{a.dtype}{list(a.shape)} array at {id(v):#x}"
        text = type_str(a.ir_dtype if isinstance(a, Var) else dtype_name(a.dtype), tuple(a.shape))
        return f"{text} #{_digest(a)[:8]}" if constants and not isinstance(a, Var) else text
    leaves, spec = tree_flatten(v)
    if spec.is_leaf():
        return f"<{t.__name__} object at {id(v):#x}>"
    text = repr(unflatten(spec, [_Text(_describe(x, constants)) for x in leaves]))
    return text if len(text) <= 200 else text[:197] + "..."


class _Text(str):
    def __repr__(self) -> str:
        return str(self)


__all__ = ["MAX_FUNCTIONS", "Capture", "register_transform"]
