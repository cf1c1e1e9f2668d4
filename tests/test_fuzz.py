"""Fuzzing the graph decoder and validator, in process and over the wire.

Properties, checked on every case:
  - in process, `Graph.from_proto(msg, limits)` either returns a graph that really is valid
    (ids in order, operands defined before use, known ops, types as inferred, names unique,
    every shape and the node count within `limits`, and it round-trips to the same id) or raises
    `gs.GraphError` (ShapeError, LimitError) with a non-empty message; never another exception;
    and it never allocates much: the tracemalloc peak of each decode is bounded by a small
    multiple of the message size (a 10^12-element shape is refused before memory is touched);
  - over the wire, RegisterGraph on a real server process answers OK (the same id as the local
    decode), INVALID_ARGUMENT or RESOURCE_EXHAUSTED with a message, exactly as the local decode
    predicts; never UNKNOWN or INTERNAL; the server stays up, healthy, logs no traceback, and its
    peak RSS does not jump.

Cases: random bytes, byte-level mutations of valid serialised graphs, deeply nested groups,
structural mutations of valid graphs (flipped ids, cycles and forward references, huge or negative
dims, over-rank shapes, unknown dtype codes, duplicate and empty names, attributes of the wrong
kind or missing or extra, oversize or short constants, unknown ops, deep chains, removed or
duplicated nodes) and graphs generated op by op (valid, nearly valid and invalid).

`pytest --fuzz` runs every campaign for at least FUZZ_EXAMPLES cases (derandomised, so CI
reproduces them); without it a fast subset runs (a few hundred cases, a few seconds).
"""

from __future__ import annotations

import math
import tracemalloc
from collections.abc import Callable

import grpc
import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from service_fixtures import SERVICE, SERVING, ServerProcess, channel, health_status

from gradserve_engine.errors import GraphError, LimitError
from gradserve_engine.ir import DEFAULT_LIMITS, Builder, Graph, Limits, Var, tensor_to_proto
from gradserve_engine.ops.core import DTYPES, NP_DTYPES, PRIMITIVES, infer
from gradserve_engine.v1 import graph_pb2 as pb
from gradserve_engine.v1 import service_pb2

FUZZ_EXAMPLES = 10_000  # per campaign with --fuzz
FAST_EXAMPLES = {"mutated": 80, "generated": 80, "bytes": 60, "wire graphs": 40, "wire bytes": 40}  # 300 in all
PB_DTYPE = {"bool": pb.BOOL, "int32": pb.INT32, "int64": pb.INT64, "float32": pb.FLOAT32, "float64": pb.FLOAT64}
DTYPE_OF_CODE = {v: k for k, v in PB_DTYPE.items()}
MiB = 1 << 20


# ---------------------------------------------------------------- the campaign runner


def run_campaign(request: pytest.FixtureRequest, name: str, strategy: st.SearchStrategy, check: Callable) -> int:
    """Run `check` on cases drawn from `strategy`: FUZZ_EXAMPLES of them with --fuzz, the fast
    subset otherwise; derandomised (the same cases on every run) and without a database."""
    n = FUZZ_EXAMPLES if request.config.getoption("--fuzz") else FAST_EXAMPLES[name]
    ran = [0]

    @settings(max_examples=n, deadline=None, derandomize=True, database=None, print_blob=False,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                                     HealthCheck.large_base_example])
    @given(strategy)
    def campaign(case):
        ran[0] += 1
        check(case)

    campaign()
    assert ran[0] >= n, f"campaign {name!r} ran {ran[0]} cases, fewer than the {n} asked for"
    return ran[0]


# ---------------------------------------------------------------- valid seed graphs: every primitive


def _subgraph(shapes: list[tuple[int, ...]], fn: Callable[..., list]) -> Graph:
    b = Builder()
    xs = [b.input(f"%arg{k}", "float64", shape) for k, shape in enumerate(shapes)]
    return b.build([(f"%out{k}", v) for k, v in enumerate(fn(b, *xs))])


BRANCHES = (_subgraph([(2, 3), (2, 3)], lambda b, x, y: [b.bind("mul", x, y)]),
            _subgraph([(2, 3), (2, 3)], lambda b, x, y: [b.bind("sin", b.bind("add", x, y))]))
SCAN_BODY = _subgraph([(2, 3), (3,)], lambda b, c, x: [
    b.bind("tanh", b.bind("mul", c, x)),
    b.bind("switch", b.const(np.int32(0)), c, b.bind("broadcast_to", x, shape=(2, 3)), branches=BRANCHES, select=(0,))])
CUSTOM_RULE = {
    "fun": (_subgraph([(2, 3), (2, 3)], lambda b, x, y: [b.bind("mul", x, y)]),),
    "fwd": (_subgraph([(2, 3), (2, 3)], lambda b, x, y: [b.bind("mul", x, y), x, y]),),
    "bwd": (_subgraph([(2, 3)] * 3, lambda b, x, y, g: [b.bind("mul", g, y), b.bind("mul", g, x)]),),
}
CUSTOM_JVP = {
    "fun": CUSTOM_RULE["fun"],
    "jvp": (_subgraph([(2, 3)] * 4, lambda b, x, y, tx, ty: [
        b.bind("mul", x, y), b.bind("add", b.bind("mul", tx, y), b.bind("mul", x, ty))]),),
}
WHILE_LOOP = {  # while sum(x) < 100: x <- x * y + 1
    "cond": (_subgraph([(2, 3), (2, 3)], lambda b, x, y: [
        b.bind("lt", b.bind("reduce_sum", x, axes=(0, 1), keepdims=False), b.const(np.float64(100)))]),),
    "body": (_subgraph([(2, 3), (2, 3)], lambda b, x, y: [b.bind("add", b.bind("mul", x, y), b.const(np.float64(1)))]),),
}
SUBGRAPHS = [*BRANCHES, SCAN_BODY, *CUSTOM_RULE["bwd"], *WHILE_LOOP["cond"]]  # what a generated "graphs" attribute draws from


def _seed_graphs() -> dict[str, pb.Graph]:
    """One small valid graph per primitive (every attribute kind and dtype class), and one graph
    with all of them together; the mutation campaign starts from these."""
    ops: dict[str, Callable] = {}
    for name, p in PRIMITIVES.items():  # the unary and binary ops without attributes, from the registry
        if p.arity == 1 and not p.attrs:
            ops[name] = lambda b, v, _n=name: b.bind(_n, v["x"])
        elif p.arity == 2 and p.elementwise:
            ops[name] = lambda b, v, _n=name: b.bind(_n, v["x"], v["k"])
    ops["cast"] = lambda b, v: b.bind("cast", v["x"], dtype="float32")
    ops["select"] = lambda b, v: b.bind("select", v["c"], v["x"], v["y"])
    ops["reduce_sum"] = lambda b, v: b.bind("reduce_sum", v["x"], axes=(1,), keepdims=False)
    ops["reduce_max"] = lambda b, v: b.bind("reduce_max", v["x"], axes=(0,), keepdims=True)
    ops["reduce_min"] = lambda b, v: b.bind("reduce_min", v["x"], axes=(0, 1), keepdims=False)
    ops["cumsum"] = lambda b, v: b.bind("cumsum", v["x"], axis=1, reverse=True)
    ops["matmul"] = lambda b, v: b.bind("matmul", v["x"], b.bind("transpose", v["y"], perm=(1, 0)))
    ops["reshape"] = lambda b, v: b.bind("reshape", v["x"], shape=(3, 2))
    ops["transpose"] = lambda b, v: b.bind("transpose", v["x"], perm=(1, 0))
    ops["broadcast_to"] = lambda b, v: b.bind("broadcast_to", v["x"], shape=(4, 2, 3))
    ops["expand_dims"] = lambda b, v: b.bind("expand_dims", v["x"], axes=(0, 3))
    ops["squeeze"] = lambda b, v: b.bind("squeeze", b.bind("expand_dims", v["x"], axes=(1,)), axes=(1,))
    ops["slice"] = lambda b, v: b.bind("slice", v["x"], starts=(0, 1), stops=(2, 3), steps=(1, 2))
    ops["pad"] = lambda b, v: b.bind("pad", v["x"], lo=(1, 0), hi=(0, 2), interior=(0, 1), value=-1.5)
    ops["concatenate"] = lambda b, v: b.bind("concatenate", v["x"], v["y"], v["k"], axis=0)
    ops["take"] = lambda b, v: b.bind("take", v["x"], v["i"], axis=1)
    ops["scatter_add"] = lambda b, v: b.bind("scatter_add", v["x"], v["i"], v["u"], axis=1)
    ops["argsort"] = lambda b, v: b.bind("argsort", v["x"], axis=1)
    ops["searchsorted"] = lambda b, v: b.bind("searchsorted", b.bind("reshape", v["k"], shape=(6,)), v["x"], right=True)
    # the higher-order ops, over subgraphs of f64[2,3] (a switch nested in a scan's body too)
    ops["switch"] = lambda b, v: b.bind("switch", b.const(np.int32(1)), v["x"], v["y"], branches=BRANCHES, select=(0,))
    ops["scan"] = lambda b, v: b.bind("scan", v["x"], v["y"], body=(SCAN_BODY,), n_carry=1, n_xs=1, length=2,
                                      reverse=False, select=(0, 1))
    ops["custom_vjp"] = lambda b, v: b.bind("custom_vjp", v["x"], v["y"], select=(0,), **CUSTOM_RULE)
    ops["custom_jvp"] = lambda b, v: b.bind("custom_jvp", v["x"], v["y"], select=(0,), **CUSTOM_JVP)
    ops["while"] = lambda b, v: b.bind("while", v["x"], v["y"], select=(0,), n_carry=1, **WHILE_LOOP)

    def gram(b: Builder, v: dict) -> Var:  # a (2, 2) matrix for the square-matrix ops
        return b.bind("matmul", v["x"], b.bind("transpose", v["y"], perm=(1, 0)))

    for name in ("cholesky", "det", "slogdet", "eigh"):
        ops[name] = lambda b, v, _n=name: b.bind(_n, gram(b, v))
    ops["solve"] = lambda b, v: b.bind("solve", gram(b, v), v["x"])
    ops["qr"] = lambda b, v: b.bind("qr", b.bind("transpose", v["x"], perm=(1, 0)))

    def graph(names: list[str]) -> pb.Graph:
        b = Builder()
        v = {"x": b.input("x", "float64", (2, 3)), "y": b.input("y", "float64", (2, 3)),
             "c": b.input("c", "bool", (2, 3)), "i": b.input("i", "int64", (2,)),
             "u": b.input("u", "float64", (2, 2)), "k": b.const(np.arange(6.0).reshape(2, 3))}
        b.const(np.array([1, 0, 1], dtype=bool))  # dead constants are dropped by build; these make dtypes varied
        outs = [(f"out{j}", ops[name](b, v)) for j, name in enumerate(names)]
        outs.append(("i32", b.bind("cast", v["i"], dtype="int32")))
        return b.build(outs).to_proto()

    seeds = {name: graph([name]) for name in ops}
    seeds["all"] = graph(list(ops))
    return seeds


SEEDS = _seed_graphs()
SEED_NAMES = sorted(SEEDS)
SEED_BYTES = {name: msg.SerializeToString() for name, msg in SEEDS.items()}


def test_seed_graphs_are_valid_and_cover_every_primitive():
    used = set()
    for name, msg in SEEDS.items():
        g = Graph.from_proto(msg)
        used |= {n.op for n in g.nodes}
        assert Graph.from_proto(pb.Graph.FromString(SEED_BYTES[name])).id == g.id
    assert used == set(PRIMITIVES), f"add seeds for {sorted(set(PRIMITIVES) - used)}"


# ---------------------------------------------------------------- the in-process property


def check_valid_graph(g: Graph, limits: Limits) -> None:
    """What a successful decode promises, re-checked independently of `validate`."""
    assert g.outputs, "a graph without outputs was accepted"
    assert len(g.nodes) <= limits.max_nodes
    names = g.input_names()
    assert len(set(names)) == len(names), f"duplicate input names {names}"
    outs = g.output_names()
    assert len(set(outs)) == len(outs), f"duplicate output names {outs}"
    assert sum(c.nbytes for c in g.constants) <= limits.max_constant_bytes
    for k, i in enumerate(g.inputs):
        assert i.id == k
    for vid in range(g.n_values):
        dtype, shape = g.aval(vid)
        assert dtype in DTYPES, (vid, dtype)
        assert all(d >= 0 for d in shape) and len(shape) <= 32, (vid, shape)
        assert math.prod(shape) <= limits.max_elements, (vid, shape)
    for k, n in enumerate(g.nodes):
        assert n.id == g.first_node_id + k
        assert n.op in PRIMITIVES, n.op
        assert all(0 <= i < n.id for i in n.inputs), n.text()
        assert infer(n.op, [g.aval(i) for i in n.inputs], n.attrs) == (n.dtype, n.shape), n.text()
    for _, vid in g.outputs:
        assert 0 <= vid < g.n_values
    again = Graph.from_proto(pb.Graph.FromString(g.to_proto().SerializeToString()), limits)
    assert again.id == g.id and str(again) == str(g)


def alloc_budget(msg: pb.Graph) -> int:
    """Bytes a decode may allocate: the Python objects for what the message holds, never a tensor
    its shapes merely declare."""
    values = len(msg.inputs) + len(msg.constants) + len(msg.nodes) + len(msg.outputs)
    return 2 * MiB + 4096 * values + 8 * msg.ByteSize()


def decode_outcome(msg: pb.Graph, limits: Limits = DEFAULT_LIMITS) -> tuple[str, str]:
    """("ok", graph id), ("limit", message) or ("invalid", message); fails the test on any other
    exception, an empty message, an invalid graph accepted, or a big allocation."""
    budget = alloc_budget(msg)
    tracemalloc.start()  # only around the decode: tracing the whole campaign would slow hypothesis down
    try:
        g = Graph.from_proto(msg, limits)
    except GraphError as e:
        outcome = ("limit" if isinstance(e, LimitError) else "invalid", str(e))
        assert outcome[1].strip(), f"{type(e).__name__} with an empty message"
    except Exception as e:
        pytest.fail(f"Graph.from_proto raised {type(e).__name__} (not a GraphError): {e}\n{_show(msg)}")
    else:
        outcome = ("ok", g.id)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak <= budget, f"decoding allocated {peak} bytes (budget {budget}) for\n{_show(msg)}"
    if outcome[0] == "ok":
        check_valid_graph(g, limits)
    return outcome


def _show(msg: pb.Graph, limit: int = 3000) -> str:
    text = str(msg)
    return text if len(text) <= limit else text[:limit] + f"\n... ({len(text)} characters)"


# ---------------------------------------------------------------- strategies: values

UINT32_IDS = st.one_of(st.integers(0, 12), st.sampled_from([2**31 - 1, 2**31, 2**32 - 1]))
NASTY_DIMS = [-1, -(2**63), 10**12, 2**31, 2**32 + 1, 2**62, 2**63 - 1, 1 << 28, (1 << 28) + 1, 1 << 14, (1 << 14) + 1]
DIMS = st.one_of(st.integers(0, 5), st.sampled_from(NASTY_DIMS))
SHAPES = st.one_of(st.lists(DIMS, max_size=6), st.lists(st.just(1), min_size=31, max_size=40),
                   st.lists(st.sampled_from([0, 2**62, 2**63 - 1, 7]), min_size=2, max_size=4))
DTYPE_CODES = st.one_of(st.sampled_from(list(PB_DTYPE.values())), st.sampled_from([0, 6, 7, 99, -1, 2**31 - 1]))
NAMES = st.one_of(st.sampled_from(["x", "y", "out", "out0", "", "x ", "é", "a.b[0]"]), st.text(max_size=8))
OP_NAMES = st.one_of(st.sampled_from(sorted(PRIMITIVES)), st.text(max_size=10), st.sampled_from(["", "Add", "add ", "__init__"]))
INT64 = st.one_of(st.integers(-3, 6), st.sampled_from([2**31, -(2**31), 2**63 - 1, -(2**63), 10**12]))
FLOATS = st.floats(allow_nan=True, allow_infinity=True)


def attr_values() -> st.SearchStrategy:
    """A wire attribute value of any kind: ("i"|"f"|"b"|"s"|"ints"|"floats"|None, value)."""
    return st.one_of(
        st.tuples(st.just("i"), INT64), st.tuples(st.just("f"), FLOATS), st.tuples(st.just("b"), st.booleans()),
        st.tuples(st.just("s"), st.one_of(st.sampled_from(DTYPES), st.text(max_size=8))),
        st.tuples(st.just("ints"), st.lists(INT64, max_size=6)),
        st.tuples(st.just("floats"), st.lists(FLOATS, max_size=4)), st.just((None, None)))


def set_attr(a: pb.Attribute, kind: str | None, value) -> None:
    a.Clear()
    if kind == "graphs":
        for g in value:
            a.graphs.graphs.add().CopyFrom(g.to_proto())
    elif kind == "ints":
        a.ints.values[:] = [min(max(v, -(2**63)), 2**63 - 1) for v in value]  # the wire's int64
        a.ints.SetInParent()
    elif kind == "floats":
        a.floats.values[:] = value
        a.floats.SetInParent()
    elif kind is not None:
        setattr(a, kind, value)


# ---------------------------------------------------------------- strategies: structural mutations


def _n_values(msg: pb.Graph) -> int:
    return len(msg.inputs) + len(msg.constants) + len(msg.nodes)


def _pick(draw, seq):
    return seq[draw(st.integers(0, len(seq) - 1))] if len(seq) else None


def m_flip_id(draw, msg):
    field = draw(st.sampled_from(["inputs", "constants", "nodes", "outputs"]))
    item = _pick(draw, getattr(msg, field))
    if item is not None:
        item.id = draw(st.one_of(UINT32_IDS, st.integers(0, _n_values(msg) + 2)))


def m_operand(draw, msg):
    """An operand that is out of range, the node itself (a cycle), a later node (a forward
    reference) or an extra/missing operand (arity)."""
    node = _pick(draw, msg.nodes)
    if node is None:
        return
    how = draw(st.sampled_from(["set", "self", "later", "append", "pop", "clear"]))
    if how == "append":
        node.inputs.append(draw(st.integers(0, _n_values(msg))))
    elif how == "pop" and node.inputs:
        node.inputs.pop()
    elif how == "clear":
        del node.inputs[:]
    elif node.inputs:
        k = draw(st.integers(0, len(node.inputs) - 1))
        node.inputs[k] = {"set": draw(UINT32_IDS), "self": node.id, "later": node.id + draw(st.integers(1, 3))}.get(how, 0)


def m_cycle(draw, msg):
    if len(msg.nodes) >= 2:
        a, b = sorted(draw(st.lists(st.integers(0, len(msg.nodes) - 1), min_size=2, max_size=2, unique=True)))
        if msg.nodes[a].inputs:
            msg.nodes[a].inputs[0] = msg.nodes[b].id  # a -> b while b (transitively) may depend on a


def _shaped(draw, msg):
    """Something with a dtype and shape: an input, a constant's tensor or a node."""
    field = draw(st.sampled_from(["inputs", "constants", "nodes"]))
    item = _pick(draw, getattr(msg, field))
    return item.value if field == "constants" and item is not None else item


def m_shape(draw, msg):
    item = _shaped(draw, msg)
    if item is not None:
        item.shape[:] = draw(SHAPES)


def m_dim(draw, msg):
    item = _shaped(draw, msg)
    if item is not None and len(item.shape):
        item.shape[draw(st.integers(0, len(item.shape) - 1))] = draw(DIMS)


def m_dtype(draw, msg):
    item = _shaped(draw, msg)
    if item is not None:
        item.dtype = draw(DTYPE_CODES)


def m_names(draw, msg):
    field = draw(st.sampled_from(["inputs", "outputs"]))
    items = getattr(msg, field)
    if not len(items):
        return
    if draw(st.booleans()) and len(items) >= 2:
        a, b = draw(st.lists(st.integers(0, len(items) - 1), min_size=2, max_size=2, unique=True))
        items[a].name = items[b].name  # duplicate
    else:
        _pick(draw, items).name = draw(NAMES)


def m_attr(draw, msg):
    """Change, add or remove an attribute: wrong kind, no value, out-of-range values, unknown key."""
    node = _pick(draw, msg.nodes)
    if node is None:
        return
    keys = sorted(node.attrs)
    how = draw(st.sampled_from(["set", "delete", "extra"]))
    if how == "delete" and keys:
        del node.attrs[draw(st.sampled_from(keys))]
    elif how == "set" and keys:
        set_attr(node.attrs[draw(st.sampled_from(keys))], *draw(attr_values()))
    else:
        set_attr(node.attrs[draw(st.sampled_from(["axes", "axis", "shape", "dtype", "zzz", ""]))], *draw(attr_values()))


def m_constant(draw, msg):
    """Oversize, short, non-0/1 bool or huge-shaped constants (with little or no data)."""
    if draw(st.booleans()) or not len(msg.constants):
        c = msg.constants.add(id=len(msg.inputs) + len(msg.constants))
    else:
        c = _pick(draw, msg.constants)
    t = c.value
    t.dtype = draw(DTYPE_CODES)
    t.shape[:] = draw(st.one_of(SHAPES, st.lists(st.integers(0, 64), max_size=2)))
    how = draw(st.sampled_from(["exact", "short", "long", "random", "bool junk", "big"]))
    itemsize = NP_DTYPES[DTYPE_OF_CODE[t.dtype]].itemsize if t.dtype in DTYPE_OF_CODE else 1
    want = math.prod(t.shape) * itemsize if all(0 <= d < 2**20 for d in t.shape) else 0
    if how == "exact" and want <= 64 * 1024:
        t.data = bytes(want)
    elif how == "short":  # one byte short (of at most 64 KiB: a 10^9-element shape must not build 8 GB here)
        t.data = bytes(max(min(want, 64 * 1024) - 1, 0))
    elif how == "long":
        t.data = bytes(min(want, 4096) + draw(st.integers(1, 9)))
    elif how == "bool junk":
        t.dtype = pb.BOOL
        t.data = bytes([draw(st.integers(2, 255))]) * min(max(want, 1), 4096)
    elif how == "big":
        t.data = bytes(draw(st.sampled_from([1 << 16, (1 << 16) + 3, 1 << 18])))
    else:
        t.data = draw(st.binary(max_size=64))


def m_op(draw, msg):
    node = _pick(draw, msg.nodes)
    if node is not None:
        node.op = draw(OP_NAMES)


def m_chain(draw, msg):
    """Deep nesting: a long chain of unary nodes on the last value (valid types), maybe an output."""
    if not len(msg.nodes):
        return
    last = msg.nodes[-1]
    op = "neg" if DTYPE_OF_CODE.get(last.dtype) in ("int32", "int64", "float32", "float64") else "stop_gradient"
    vid = last.id
    length = draw(st.sampled_from([1, 10, 200, 1000]))
    if vid + length >= 2**32:  # ids are uint32
        return
    for _ in range(length):
        vid += 1
        msg.nodes.add(id=vid, op=op, inputs=[vid - 1], dtype=last.dtype, shape=last.shape)
    if draw(st.booleans()):
        msg.outputs.add(name="deep", id=vid)


def m_structure(draw, msg):
    """Remove, duplicate or swap nodes/inputs/constants/outputs: ids no longer dense and ordered."""
    field = draw(st.sampled_from(["inputs", "constants", "nodes", "outputs"]))
    items = getattr(msg, field)
    if not len(items):
        return
    how = draw(st.sampled_from(["remove", "duplicate", "swap", "clear"]))
    k = draw(st.integers(0, len(items) - 1))
    if how == "remove":
        del items[k]
    elif how == "duplicate":
        items.add().CopyFrom(items[k])
    elif how == "clear":
        del items[:]
    elif len(items) >= 2:
        j = (k + 1) % len(items)
        a, b = type(items[k])(), type(items[k])()
        a.CopyFrom(items[k])
        b.CopyFrom(items[j])
        items[k].CopyFrom(b)
        items[j].CopyFrom(a)


def m_output(draw, msg):
    msg.outputs.add(name=draw(NAMES), id=draw(st.one_of(UINT32_IDS, st.integers(0, _n_values(msg) + 1))))


MUTATIONS = [m_flip_id, m_operand, m_cycle, m_shape, m_dim, m_dtype, m_names, m_attr, m_constant, m_op, m_chain,
             m_structure, m_output]


@st.composite
def mutated_graphs(draw) -> pb.Graph:
    msg = pb.Graph()
    msg.CopyFrom(SEEDS[draw(st.sampled_from(SEED_NAMES))])
    for _ in range(draw(st.integers(1, 3))):
        draw(st.sampled_from(MUTATIONS))(draw, msg)
    return msg


# ---------------------------------------------------------------- strategies: graphs generated op by op

SMALL_SHAPES = st.lists(st.integers(0, 3), max_size=3)
OPS = sorted(PRIMITIVES)


def _attr_for(draw, op: str, key: str, kind: str, shape: tuple[int, ...]):
    """A value for attribute `key` that is often right for an operand of `shape`."""
    r = len(shape)
    if kind == "int":
        return ("i", draw(st.integers(-1, r)))
    if kind == "bool":
        return ("b", draw(st.booleans()))
    if kind == "float":
        return ("f", draw(FLOATS))
    if kind == "dtype":
        return ("s", draw(st.sampled_from(DTYPES)))
    if kind == "graphs":
        return ("graphs", draw(st.lists(st.sampled_from(SUBGRAPHS), min_size=1, max_size=3)))
    if key == "perm":
        return ("ints", list(draw(st.permutations(range(r)))))
    if key == "shape" and op == "reshape":
        n = math.prod(shape)
        return ("ints", draw(st.sampled_from([[n], [1, n], list(reversed(shape)), [n, 1], [2, -1]])))
    if key == "shape":
        return ("ints", draw(st.sampled_from([list(shape), [2, *shape], [3, 1, *shape], list(shape)[1:]])))
    if key in ("starts", "lo", "hi", "interior"):
        return ("ints", [draw(st.integers(0, 1)) for _ in range(r)])
    if key == "stops":
        return ("ints", list(shape))
    if key == "steps":
        return ("ints", [draw(st.integers(1, 2)) for _ in range(r)])
    if key == "axes" and op == "expand_dims":
        return ("ints", sorted(draw(st.sets(st.integers(0, r + 1), max_size=2))))
    return ("ints", sorted(draw(st.sets(st.integers(0, max(r - 1, 0)), max_size=r))))


def _declarable(aval) -> bool:
    """An inferred type that fits the wire's dtype enum and int64 dims."""
    return (aval is not None and isinstance(aval[0], str) and aval[0] in PB_DTYPE and isinstance(aval[1], tuple)
            and all(isinstance(d, int) and -(2**63) <= d < 2**63 for d in aval[1]))


def _fits_operand(op: str, j: int, aval, first) -> bool:
    """Whether `aval` is a plausible operand `j` of `op` (given operand 0): the generator prefers
    these, so that many generated nodes type-check."""
    dtype, shape = aval
    if j > 0 and first is None:
        return dtype is not None
    if op == "select":
        return dtype == "bool" if j == 0 else dtype is not None and (j == 1 or dtype == first[0])
    if op in ("take", "scatter_add") and j == 1:
        return dtype in ("int32", "int64")
    if j == 0:
        return dtype in ("float32", "float64") or (dtype is not None and op not in _FLOAT_ONLY)
    if op == "matmul":
        return dtype == first[0] and len(shape) >= 2 and len(first[1]) >= 2 and shape[-2] == first[1][-1]
    return dtype == first[0] and (shape == first[1] or shape == ())


_FLOAT_ONLY = {"exp", "log", "log1p", "expm1", "sin", "cos", "tan", "tanh", "logistic", "sqrt", "floor", "ceil", "div",
               "pow", "atan2"}


@st.composite
def generated_graphs(draw) -> pb.Graph:
    """Inputs, constants and nodes drawn one by one; each node's operands and attributes are
    drawn to fit and its declared type is what inference gives. Half the graphs are careful (most
    of them valid: the campaign reaches deep into validation); in the other half every choice may
    go wrong now and then (unknown dtype codes and ops, odd names, wrong data, arity, attributes,
    declarations, ids)."""
    sloppy = draw(st.booleans())

    def oops(n: int) -> bool:  # a one-in-n defect, only in sloppy graphs
        return sloppy and draw(st.integers(0, n - 1)) == 0

    msg = pb.Graph()
    avals: list[tuple[str | None, tuple[int, ...]]] = []
    for k in range(draw(st.integers(0 if sloppy else 1, 3))):
        code = draw(DTYPE_CODES) if oops(4) else PB_DTYPE[draw(st.sampled_from(["float64", "float64", "float32", *DTYPES]))]
        shape = draw(SHAPES) if oops(4) else draw(SMALL_SHAPES)
        msg.inputs.add(id=k, name=draw(NAMES) if oops(3) else f"x{k}", dtype=code, shape=shape)
        avals.append((DTYPE_OF_CODE.get(code), tuple(shape)))
    for _ in range(draw(st.integers(0, 2))):
        dtype = draw(st.sampled_from(DTYPES))
        shape = tuple(draw(SMALL_SHAPES))
        value = np.arange(math.prod(shape)).reshape(shape).astype(dtype)
        if dtype == "bool":
            value = value % 2 == 0
        c = msg.constants.add(id=len(avals), value=tensor_to_proto(value))
        if oops(5):
            c.value.data = draw(st.binary(max_size=32))
        avals.append((dtype, shape))
    for _ in range(draw(st.integers(0, 6))):
        op = draw(OP_NAMES) if oops(6) else draw(st.sampled_from(OPS))
        prim = PRIMITIVES.get(op)
        arity = prim.arity if prim is not None and prim.arity is not None else draw(st.integers(1, 3))
        if oops(8):
            arity = draw(st.integers(0, 4))
        hi = len(avals) - 1
        if hi < 0 and not sloppy:
            break
        operands = []
        for j in range(arity):
            if oops(8) or hi < 0:
                operands.append(draw(UINT32_IDS))
                continue
            first = avals[operands[0]] if operands and operands[0] <= hi else None
            fits = [i for i in range(hi + 1) if _fits_operand(op, j, avals[i], first)]
            operands.append(draw(st.sampled_from(fits)) if fits and draw(st.integers(0, 4)) else draw(st.integers(0, hi)))
        known = [avals[i] for i in operands if i < len(avals)]
        first_shape = known[0][1] if known else ()
        attrs = {}
        for key, kind in (prim.attrs if prim is not None else {}).items():
            if not oops(10):  # sometimes missing
                attrs[key] = draw(attr_values()) if oops(6) else _attr_for(draw, op, key, kind, first_shape)
        declared: tuple[str | None, tuple[int, ...]] | None = None
        if prim is not None and len(known) == len(operands) and all(d is not None for d, _ in known):
            try:
                values = {k: (tuple(v) if kind in ("ints", "graphs") else v) for k, (kind, v) in attrs.items()
                          if kind is not None}
                declared = infer(op, known, values)
            except Exception:  # the decoder meets the same problem and must report it as a GraphError
                declared = None
        if not _declarable(declared) or oops(6):
            declared = (draw(st.sampled_from(DTYPES)), tuple(draw(st.one_of(SMALL_SHAPES, SHAPES))))
        node = msg.nodes.add(id=len(avals), op=op, inputs=operands, dtype=PB_DTYPE[declared[0]], shape=declared[1])
        for key, (kind, value) in attrs.items():
            set_attr(node.attrs[key], kind, value)
        avals.append(declared)
    if avals or sloppy:
        names = ["out", "out0", "out1", ""] if sloppy else ["out0", "out1", "out2"]
        for name in draw(st.lists(st.sampled_from(names), min_size=0 if sloppy else 1, max_size=3, unique=not sloppy)):
            vid = draw(UINT32_IDS) if oops(5) or not avals else draw(st.integers(len(avals) // 2, len(avals) - 1))
            msg.outputs.add(name=name, id=vid)
    return msg


# ---------------------------------------------------------------- strategies: bytes


def nested_groups(depth: int, field: int = 15) -> bytes:
    """`depth` nested unknown groups (wire type 3/4): deep nesting the parser must bound."""
    return bytes([(field << 3) | 3]) * depth + bytes([(field << 3) | 4]) * depth


@st.composite
def mutated_bytes(draw) -> bytes:
    data = bytearray(SEED_BYTES[draw(st.sampled_from(SEED_NAMES))])
    for _ in range(draw(st.integers(1, 4))):
        how = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete", "splice"]))
        k = draw(st.integers(0, max(len(data) - 1, 0)))
        if how == "flip" and data:
            data[k] ^= 1 << draw(st.integers(0, 7))
        elif how == "set" and data:
            data[k] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0xFF, 0x0A, 0x12, 0x1A, 0x22]))
        elif how == "truncate":
            del data[k:]
        elif how == "insert":
            data[k:k] = draw(st.binary(min_size=1, max_size=12))
        elif how == "delete":
            del data[k:k + draw(st.integers(1, 8))]
        else:
            other = SEED_BYTES[draw(st.sampled_from(SEED_NAMES))]
            j = draw(st.integers(0, len(other)))
            data[k:] = other[j:]
    return bytes(data)


GRAPH_BYTES = st.one_of(
    st.binary(max_size=256),
    mutated_bytes(),
    mutated_bytes(),
    st.sampled_from([50, 99, 100, 101, 1000, 100_000]).map(nested_groups),
    st.builds(lambda prefix, depth: prefix + nested_groups(depth, 3), st.sampled_from(list(SEED_BYTES.values())),
              st.sampled_from([64, 100, 10_000])),
)


def bytes_outcome(data: bytes) -> tuple[str, str]:
    try:
        msg = pb.Graph.FromString(data)
    except DecodeError as e:
        return ("undecodable", str(e))
    return decode_outcome(msg)


# ---------------------------------------------------------------- campaigns in process

# max_elements >= 1: with 0 a scalar would still pass (check_shape compares the count only per dimension)
SMALL_LIMITS = st.builds(Limits, max_nodes=st.integers(0, 20), max_elements=st.integers(1, 64),
                         max_constant_bytes=st.integers(0, 256))
LIMITS = st.one_of(st.just(DEFAULT_LIMITS), st.just(DEFAULT_LIMITS), SMALL_LIMITS)


def test_fuzz_mutated_graphs_in_process(request):
    run_campaign(request, "mutated", st.tuples(mutated_graphs(), LIMITS), lambda case: decode_outcome(*case))


def test_fuzz_generated_graphs_in_process(request):
    outcomes: dict[str, int] = {}

    def check(case):
        kind = decode_outcome(*case)[0]
        outcomes[kind] = outcomes.get(kind, 0) + 1

    run_campaign(request, "generated", st.tuples(generated_graphs(), LIMITS), check)
    # the generator must reach past the first checks: valid graphs and each kind of refusal occur
    assert outcomes.get("ok", 0) >= 5 and outcomes.get("invalid", 0) >= 5 and outcomes.get("limit", 0) >= 1, outcomes


def test_fuzz_bytes_in_process(request):
    run_campaign(request, "bytes", GRAPH_BYTES, bytes_outcome)


# ---------------------------------------------------------------- campaigns over the wire

EXPECTED_CODE = {"ok": grpc.StatusCode.OK, "limit": grpc.StatusCode.RESOURCE_EXHAUSTED,
                 "invalid": grpc.StatusCode.INVALID_ARGUMENT, "undecodable": grpc.StatusCode.INVALID_ARGUMENT}


def _vm(pid: int, key: str) -> int:
    """VmRSS / VmHWM of a process, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


class Wire:
    """A server process, a raw (bytes in, bytes out) RegisterGraph callable and a checker."""

    def __init__(self, server: ServerProcess):
        self.server = server
        self.channel = channel(server.address)
        self.register = self.channel.unary_unary(f"/{SERVICE}/RegisterGraph", request_serializer=None,
                                                 response_deserializer=None)
        self.codes: dict[str, int] = {}

    def check(self, raw: bytes, expected: tuple[str, str]) -> None:
        try:
            resp = self.register(raw, timeout=30)
        except grpc.RpcError as e:
            code, details = e.code(), e.details() or ""
        else:
            code, details = grpc.StatusCode.OK, service_pb2.RegisterGraphResponse.FromString(resp).graph_id
        self.codes[code.name] = self.codes.get(code.name, 0) + 1
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED), \
            f"RegisterGraph answered {code.name}: {details!r} for {raw[:200]!r}"
        assert details.strip(), f"{code.name} without a message for {raw[:200]!r}"
        kind, what = expected
        assert code == EXPECTED_CODE[kind], f"answered {code.name} ({details!r}), the local decode gives {kind}: {what!r}"
        if kind in ("ok", "limit", "invalid"):
            assert details == what, f"the server's answer {details!r} differs from the local decode's {what!r}"
        else:
            assert "do not parse as RegisterGraphRequest" in details, details

    def healthy(self) -> None:
        assert self.server.proc.poll() is None, f"the server exited:\n{self.server.stderr()}"
        assert health_status(self.channel) == SERVING
        log = self.server.stderr()
        assert "Traceback" not in log and "internal error" not in log, log[-4000:]


@pytest.fixture(scope="module")
def wire(server):
    w = Wire(server)  # the module's server (conftest.py); bare channels disable proxies
    try:
        yield w
    finally:
        w.channel.close()


def _request_outcome(raw: bytes) -> tuple[str, str]:
    """The local prediction for RegisterGraph bytes."""
    try:
        req = service_pb2.RegisterGraphRequest.FromString(raw)
    except DecodeError as e:
        return ("undecodable", str(e))
    return decode_outcome(req.graph)


def _peak_rss_guard(wire: Wire, run: Callable[[], int]) -> None:
    pid = wire.server.proc.pid
    seed = service_pb2.RegisterGraphRequest(graph=SEEDS["all"]).SerializeToString()
    wire.check(seed, ("ok", Graph.from_proto(SEEDS["all"]).id))
    before = _vm(pid, "VmHWM")
    run()
    growth = _vm(pid, "VmHWM") - before
    wire.healthy()
    assert growth < 64 * MiB, f"the server's peak RSS grew by {growth / MiB:.1f} MiB during the campaign ({wire.codes})"


def test_fuzz_graphs_over_the_wire(request, wire):
    def check(msg):
        raw = service_pb2.RegisterGraphRequest(graph=msg).SerializeToString()
        wire.check(raw, _request_outcome(raw))

    strategy = st.one_of(mutated_graphs(), generated_graphs())
    _peak_rss_guard(wire, lambda: run_campaign(request, "wire graphs", strategy, check))


def test_fuzz_bytes_over_the_wire(request, wire):
    def check(raw):
        wire.check(raw, _request_outcome(raw))

    request_bytes = st.one_of(
        GRAPH_BYTES.map(lambda data: b"\x0a" + _varint(len(data)) + data),  # as field 1 (graph) of the request
        GRAPH_BYTES)  # as the request itself
    _peak_rss_guard(wire, lambda: run_campaign(request, "wire bytes", request_bytes, check))


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


# ---------------------------------------------------------------- fixed nasty cases, both ways


def _zero_then_huge() -> pb.Graph:
    """A constant of shape [0, 2^62, 2^62]: zero elements (no data needed), but a shape numpy cannot hold."""
    msg = pb.Graph()
    msg.inputs.add(id=0, name="x", dtype=pb.FLOAT64)
    msg.constants.add(id=1, value=pb.Tensor(dtype=pb.FLOAT64, shape=[0, 2**62, 2**62]))
    msg.outputs.add(name="out", id=1)
    return msg


def _huge_everywhere() -> list[pb.Graph]:
    out = []
    for where in ("input", "constant", "constant with data", "node", "broadcast_to attr"):
        msg = pb.Graph()
        msg.CopyFrom(SEEDS["all"])
        if where == "input":
            msg.inputs[0].shape[:] = [10**6, 10**6]
        elif where == "constant":
            msg.constants[0].value.shape[:] = [10**12]
        elif where == "constant with data":
            msg.constants[0].value.shape[:] = [10**6, 10**6]
            msg.constants[0].value.data = bytes(1 << 16)
        elif where == "node":
            msg.nodes[0].shape[:] = [10**12]
        else:
            node = next(n for n in msg.nodes if n.op == "broadcast_to")
            node.attrs["shape"].ints.values[:] = [10**6, 10**6]
            node.shape[:] = [10**6, 10**6]
        out.append(msg)
    return out


NASTY = {
    **{f"10^12 elements in a {w}": m for w, m in zip(("input", "constant", "constant with data", "node", "broadcast_to attr"),
                                                     _huge_everywhere(), strict=True)},
    "zero dim then 2^62 dims in a constant": _zero_then_huge(),
}
NASTY_BYTES = {f"{d} nested groups": nested_groups(d) for d in (100, 101, 100_000)}


@pytest.mark.parametrize("name", sorted(NASTY))
def test_nasty_graphs(name, wire):
    msg = NASTY[name]
    outcome = decode_outcome(msg)
    assert outcome[0] in ("limit", "invalid"), outcome
    raw = service_pb2.RegisterGraphRequest(graph=msg).SerializeToString()
    wire.check(raw, outcome)


@pytest.mark.parametrize("name", sorted(NASTY_BYTES))
def test_nasty_bytes(name, wire):
    data = NASTY_BYTES[name]
    outcome = bytes_outcome(data)
    assert outcome[0] in ("undecodable", "invalid"), outcome  # an empty graph has no outputs
    wire.check(data, _request_outcome(data))
