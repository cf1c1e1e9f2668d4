"""Pytrees: nested containers of arrays, flattened to named leaves and rebuilt, on optree.

Containers are what optree knows in gradserve's registry namespace ("gradserve") or its global
one: dicts (kept in insertion order), lists, tuples, namedtuples, OrderedDicts, defaultdicts,
deques, dataclasses (registered here on first sight: every field is a child, and rebuilding sets
the fields on a new instance without calling `__init__`), and whatever a user registers with
`register_pytree_node`. `None` is an empty subtree, not a leaf. Leaves are named by their path
from the parameter: dict keys and attributes with `.` (`params.w1`, `point.x`), sequence
indices with `[i]` (`xs[0]`), other keys as `[repr]`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import optree

NAMESPACE = "gradserve"

# Leaves in the order the user wrote the dict (optree sorts dict keys by default): graph inputs
# keep the order of the code, and the graphs, their ids and the stored ones stay what they were
# before optree. The setting is per namespace, so it touches no other user of optree; entered for
# the life of the process (the reference keeps the context manager from being collected, which
# would restore the sorted order).
_INSERTION_ORDERED = optree.dict_insertion_ordered(True, namespace=NAMESPACE)
_INSERTION_ORDERED.__enter__()

# leaf types that are never an unregistered dataclass (the check is on every call's path)
_PLAIN = frozenset({np.ndarray, float, int, bool, str, bytes, complex, type(None), np.float64, np.float32,
                    np.int64, np.int32, np.bool_})
_register_lock = threading.Lock()


def register_pytree_node(cls: type, flatten_func: Callable[[Any], tuple], unflatten_func: Callable[[Any, Iterable], Any],
                         *, path_entry_type: type = optree.AutoEntry) -> type:
    """Make `cls` a container for gradserve (optree's `register_pytree_node` in the "gradserve"
    namespace): `flatten_func(obj)` returns `(children, metadata)` or `(children, metadata,
    entries)` (entries name the children: strings give `.name`, integers `[i]`);
    `unflatten_func(metadata, children)` rebuilds it."""
    return optree.register_pytree_node(cls, flatten_func, unflatten_func, path_entry_type=path_entry_type,
                                       namespace=NAMESPACE)


def _register_dataclass(cls: type) -> None:
    names = tuple(f.name for f in dataclasses.fields(cls))

    def flat(obj: Any) -> tuple[list[Any], tuple[str, ...], tuple[str, ...]]:
        return [getattr(obj, n) for n in names], names, names

    def unflat(_metadata: object, children: Iterable[Any]) -> Any:  # the metadata is `names`
        obj: Any = object.__new__(cls)  # no __init__/__post_init__: they would run on traced values and gradients
        for n, v in zip(names, children, strict=True):
            object.__setattr__(obj, n, v)  # frozen dataclasses too
        return obj

    with _register_lock, contextlib.suppress(ValueError):  # registered meanwhile (or by the user): theirs stands
        optree.register_pytree_node(cls, flat, unflat, path_entry_type=optree.GetAttrEntry, namespace=NAMESPACE)


def _new_dataclasses(leaves: Sequence[Any]) -> list[type]:
    return [type(x) for x in leaves
            if type(x) not in _PLAIN and dataclasses.is_dataclass(x) and not isinstance(x, type)]


def tree_flatten(tree: Any) -> tuple[list[Any], optree.PyTreeSpec]:
    """optree's flatten in gradserve's namespace, registering the dataclasses it meets as leaves."""
    while True:
        leaves, spec = optree.tree_flatten(tree, none_is_leaf=False, namespace=NAMESPACE)
        new = _new_dataclasses(leaves)
        if not new:
            return leaves, spec
        for cls in set(new):
            _register_dataclass(cls)


_LEAF_ARGS = frozenset({float, int, bool, np.ndarray, np.float64, np.float32, np.int64, np.int32, np.bool_})


@functools.cache
def _positional_spec(n: int) -> optree.PyTreeSpec:
    call: Any = ((0,) * n, {})  # Any like every tree here: optree annotates trees as PyTree[T], which
    # mypy reads as a class no tuple or dict is an instance of
    return optree.tree_structure(call, none_is_leaf=False, namespace=NAMESPACE)


def flatten_call(args: tuple, kwargs: dict[str, Any]) -> tuple[list[Any], optree.PyTreeSpec]:
    """`tree_flatten((args, kwargs))`, with a fast path for the common call of a transformed
    function: positional arrays and numbers only (the same leaves and spec, without optree's walk)."""
    if not kwargs:
        for a in args:
            if type(a) not in _LEAF_ARGS:
                break
        else:
            return list(args), _positional_spec(len(args))
    return tree_flatten((args, kwargs))


def _entry_name(e: Any) -> str:
    if isinstance(e, (optree.NamedTupleEntry, optree.StructSequenceEntry)):
        return f".{e.field}"
    if isinstance(e, optree.GetAttrEntry):
        return f".{e.name}"
    if isinstance(e, optree.MappingEntry):
        return f".{e.key}" if isinstance(e.key, str) else f"[{e.key!r}]"
    if isinstance(e, optree.SequenceEntry):
        return f"[{e.index}]"
    entry = e.entry
    return f".{entry}" if isinstance(entry, str) else f"[{entry!r}]"


def flatten(tree: Any, prefix: str) -> tuple[list[tuple[str, Any]], optree.PyTreeSpec]:
    """Leaves with their names (`params.w1`, `xs[0]`) and a structure to rebuild the tree."""
    while True:
        accessors, leaves, spec = optree.tree_flatten_with_accessor(tree, none_is_leaf=False, namespace=NAMESPACE)
        new = _new_dataclasses(leaves)
        if not new:
            break
        for cls in set(new):
            _register_dataclass(cls)
    named = [(prefix + "".join(_entry_name(e) for e in acc), x) for acc, x in zip(accessors, leaves, strict=True)]
    if len(named) > 1:
        seen: set[str] = set()
        for name, _ in named:
            if name in seen:
                raise ValueError(f"two leaves of {prefix or 'the tree'} are both named {name!r} "
                                 "(a key with a '.' in it?); rename one")
            seen.add(name)
    return named, spec


def unflatten(treedef: optree.PyTreeSpec, leaves: Iterable[Any]) -> Any:
    return optree.tree_unflatten(treedef, leaves)


__all__ = ["NAMESPACE", "flatten", "register_pytree_node", "tree_flatten", "unflatten"]
