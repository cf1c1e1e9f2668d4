"""The IR: wire round trips, graph identity, the printer, validation of graphs from outside,
freshness of the generated protobuf stubs, and the tensor wire helpers."""

from __future__ import annotations

import re
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

import gradserve as gs
from gradserve_engine import ir
from gradserve_engine.ir import Builder, Graph, Input, Limits, Node, tensor_from_proto, tensor_to_proto
from gradserve_engine.ops.core import ATTR_KINDS, DTYPES, PRIMITIVES
from gradserve_engine.v1 import graph_pb2 as pb

ROOT = Path(__file__).resolve().parent.parent
PB_DTYPE = {"bool": pb.BOOL, "int32": pb.INT32, "int64": pb.INT64, "float32": pb.FLOAT32, "float64": pb.FLOAT64}


# ---------------------------------------------------------------- graphs to work on


def f_scalars(x, y):
    return gs.sin(x) * y + 2.0


def f_mlp(params, x, labels):
    h = gs.relu(x @ params["w1"] + params["b1"])
    return gs.cross_entropy(h @ params["w2"], labels)


def f_attrs(x, idx, mask):
    """Touches every op with attributes, so every attribute kind (int, float, bool, dtype, ints, graphs)."""
    p = gs.pad(x, ((1, 2), (0, 1)), constant_values=-1.5)  # ints lo/hi/interior, float value
    c = gs.cumsum(p, axis=1, reverse=True)  # int axis, bool reverse
    t = gs.take(c, idx, axis=0)  # int axis, int64 operand
    tt = gs.transpose(t, (1, 0))  # ints perm
    r = gs.reshape(tt, (2, -1))  # ints shape
    s = r[:, ::2]  # slice starts/stops/steps
    e = gs.expand_dims(s, 0)  # ints axes
    q = gs.squeeze(e, 0)
    b = gs.broadcast_to(q, (3, 2, q.shape[1]))
    mx = gs.max(b, axis=(0, 2), keepdims=True)  # ints axes, bool keepdims
    mn = gs.min(b, axis=0)
    cat = gs.concatenate([gs.sum(mn, axis=1), gs.reshape(mx, (2,))])  # variadic, int axis
    m = gs.where(mask, gs.astype(cat, np.float32), np.float32(0.5))  # cast: dtype attribute
    chosen = gs.cond(gs.sum(cat) > 0, lambda v: v * 2.0, lambda v: gs.sin(v), cat)  # graphs: the branches
    return {"m": m, "total": gs.sum(cat), "chosen": chosen}


def f_consts(x):
    """Constants of every dtype: bool, int32, int64, float32, float64 (0-d and arrays)."""
    b = np.array([True, False, True])
    i32 = np.array([1, -2, 3], dtype=np.int32)
    i64 = np.array([7, 8, 9], dtype=np.int64)
    f32 = np.array([0.25, -1.5, 3.0], dtype=np.float32)
    f64 = np.array([1e-300, -0.0, np.pi])
    y = gs.where(b, x, f64) * np.float64(2.5)
    return y, (gs.astype(x, np.int32) + i32) * np.int32(3), gs.astype(x, np.int64) * i64, gs.astype(x, np.float32) - f32


BIG_T = np.arange(6.0).reshape(2, 3).astype(">f8").T  # big-endian and non-contiguous


def f_foreign_consts(x):
    return x * BIG_T, gs.astype(x, np.int32) + np.array([1, 2], dtype=">i4")


MLP_ARGS = ({"w1": np.ones((4, 3)), "b1": np.zeros(3), "w2": np.ones((3, 2))}, np.ones((5, 4)), np.array([0, 1, 0, 1, 1]))

CASES = {
    "scalars": (f_scalars, (1.0, 2.0)),
    "mlp": (f_mlp, MLP_ARGS),
    "attrs": (f_attrs, (np.arange(6.0).reshape(2, 3), np.array([0, 4, 1]), np.array([True, False, True, False]))),
    "consts": (f_consts, (np.ones(3),)),
    "foreign consts": (f_foreign_consts, (np.ones((3, 2)),)),
}


def traced(name: str) -> Graph:
    f, args = CASES[name]
    return gs.trace(f, *args)


def base_graph() -> Graph:
    """%0 x f64[3], %1 y f64[3], %2 const f64[]; %3 sin, %4 mul, %5 reduce_sum, %6 add; outputs out=%6, m=%4."""
    b = Builder()
    x = b.input("x", "float64", (3,))
    y = b.input("y", "float64", (3,))
    c = b.const(np.float64(2.0))
    s = b.bind("sin", x)
    m = b.bind("mul", s, y)
    r = b.bind("reduce_sum", m, axes=(0,), keepdims=False)
    o = b.bind("add", r, c)
    g = b.build([("out", o), ("m", m)])
    assert [n.id for n in g.nodes] == [3, 4, 5, 6]
    return g


def base_msg() -> pb.Graph:
    return base_graph().to_proto()


def node(msg: pb.Graph, vid: int) -> pb.Node:
    (n,) = [n for n in msg.nodes if n.id == vid]
    return n


def raises(msg: pb.Graph, *fragments: str, exc: type[Exception] = gs.GraphError, limits: Limits = ir.DEFAULT_LIMITS) -> str:
    """Decode `msg`, expecting `exc` whose message contains every fragment."""
    with pytest.raises(exc) as info:
        Graph.from_proto(msg, limits=limits)
    text = str(info.value)
    for f in fragments:
        assert f in text, f"{f!r} not in error message {text!r}"
    return text


def wire(g: Graph) -> bytes:
    return g.to_proto().SerializeToString(deterministic=True)


# ---------------------------------------------------------------- round trips and identity


@pytest.mark.parametrize("name", sorted(CASES))
def test_round_trip_keeps_id_text_and_bytes(name):
    g = traced(name)
    data = wire(g)
    back = Graph.from_proto(pb.Graph.FromString(data))
    assert back.id == g.id
    assert str(back) == str(g)
    assert wire(back) == data
    assert back.input_names() == g.input_names() and back.output_names() == g.output_names()
    assert [(n.op, n.inputs, n.attrs, n.dtype, n.shape) for n in back.nodes] == [
        (n.op, n.inputs, n.attrs, n.dtype, n.shape) for n in g.nodes]
    for a, b in zip(back.constants, g.constants, strict=True):
        assert a.dtype.name == b.dtype.name and a.dtype.isnative and a.shape == b.shape and np.array_equal(a, b)
    # a second trip is a fixed point too
    assert wire(Graph.from_proto(back.to_proto())) == data


def test_round_trip_cases_cover_what_they_claim():
    mlp = traced("mlp")
    assert mlp.constants and "int64" in {i.dtype for i in mlp.inputs}
    attrs = traced("attrs")
    seen_kinds = set()
    for n in attrs.nodes:
        for key, kind in PRIMITIVES[n.op].attrs.items():
            seen_kinds.add(kind)
            assert key in n.attrs
    assert seen_kinds == set(ATTR_KINDS)
    (pad,) = [n for n in attrs.nodes if n.op == "pad"]
    assert pad.attrs["value"] == -1.5 and isinstance(pad.attrs["value"], float)
    assert {"pad", "cumsum", "take", "transpose", "reshape", "slice", "expand_dims", "squeeze", "broadcast_to",
            "reduce_max", "reduce_min", "reduce_sum", "concatenate", "cast", "switch"} <= {n.op for n in attrs.nodes}
    consts = traced("consts")
    assert {c.dtype.name for c in consts.constants} == set(DTYPES)
    assert any(c.ndim == 0 for c in consts.constants)


def test_attribute_values_survive_the_wire_exactly():
    b = Builder()
    x = b.input("x", "float32", (2, 3))
    p = b.bind("pad", x, lo=(0, 1), hi=(1, 0), interior=(0, 2), value=-0.0)
    q = b.bind("pad", p, lo=(0, 0), hi=(0, 0), interior=(0, 0), value=1e-310)
    s = b.bind("reduce_sum", q, axes=(), keepdims=True)  # empty tuple attribute
    c = b.bind("cast", s, dtype="int32")
    u = b.bind("cumsum", c, axis=1, reverse=False)  # a False bool and an int attribute
    g = b.build([("u", u)])
    back = Graph.from_proto(pb.Graph.FromString(wire(g)))
    attrs = [n.attrs for n in back.nodes]
    assert attrs[0] == {"lo": (0, 1), "hi": (1, 0), "interior": (0, 2), "value": -0.0}
    assert str(attrs[0]["value"]) == "-0.0"
    assert attrs[1]["value"] == 1e-310
    assert attrs[2] == {"axes": (), "keepdims": True}
    assert attrs[3] == {"dtype": "int32"}
    assert attrs[4] == {"axis": 1, "reverse": False}
    assert type(attrs[4]["reverse"]) is bool and type(attrs[4]["axis"]) is int
    assert back.id == g.id and str(back) == str(g) and wire(back) == wire(g)


def test_id_is_deterministic_across_separate_traces():
    for name, (f, args) in CASES.items():
        g1, g2 = gs.trace(f, *args), gs.trace(f, *args)
        assert g1 is not g2
        assert g1.id == g2.id, name
        assert re.fullmatch(r"[0-9a-f]{64}", g1.id)
        assert wire(g1) == wire(g2)
    # a different function object with the same body gives the same id
    assert gs.trace(lambda x, y: gs.sin(x) * y + 2.0, 1.0, 2.0).id == traced("scalars").id


def test_id_differs_when_the_computation_differs():
    def one(c=2.0, op=gs.sin, shape=(3,), name="x", axis=0, cdtype=np.float64):
        b = Builder()
        x = b.input(name, "float64", shape)
        y = b.bind(op.__name__, x)
        y = b.bind("reduce_sum", y, axes=(axis,), keepdims=False) if shape else y
        y = b.bind("add", y, b.bind("cast", b.const(np.asarray(c, dtype=cdtype)), dtype="float64"))
        return b.build([("out", y)])

    base = one()
    variants = {
        "constant value": one(c=3.0),
        "constant dtype": one(cdtype=np.float32),
        "op": one(op=gs.cos),
        "input name": one(name="z"),
        "shape": one(shape=(4,)),
        "rank": one(shape=(3, 1)),
        "attribute": one(shape=(3, 1), axis=1),
    }
    assert one().id == base.id
    ids = {k: g.id for k, g in variants.items()}
    for k, v in ids.items():
        assert v != base.id, k
    assert len(set(ids.values())) == len(ids)


def test_id_differs_for_attribute_and_output_changes_on_the_wire():
    g = base_graph()
    msg = g.to_proto()
    node(msg, 5).attrs["keepdims"].b = True
    node(msg, 5).shape[:] = [1]
    node(msg, 6).shape[:] = [1]
    a = Graph.from_proto(msg)
    assert a.id != g.id
    msg = g.to_proto()
    msg.outputs[1].name = "mm"
    assert Graph.from_proto(msg).id != g.id
    msg = g.to_proto()
    node(msg, 3).op = "cos"
    assert Graph.from_proto(msg).id != g.id
    msg = g.to_proto()
    msg.constants[0].value.CopyFrom(tensor_to_proto(np.float64(2.5)))
    assert Graph.from_proto(msg).id != g.id
    assert Graph.from_proto(g.to_proto()).id == g.id


# ---------------------------------------------------------------- the printer


def test_printer_shows_nodes_types_attributes_and_outputs():
    g = base_graph()
    text = str(g)
    lines = text.splitlines()
    assert lines[0].startswith("{ lambda ")
    assert "x=%0:f64[3]" in lines[0] and "y=%1:f64[3]" in lines[0] and "%2:f64[]=2." in lines[0]
    body = [ln.strip() for ln in lines[1:-1]]
    assert body == [
        "%3:f64[3] = sin %0",
        "%4:f64[3] = mul %3 %1",
        "%5:f64[] = reduce_sum[axes=(0,) keepdims=False] %4",
        "%6:f64[] = add %5 %2",
    ]
    assert lines[-1].strip() == "in (out=%6, m=%4) }"


def test_printer_on_a_traced_graph_has_one_line_per_node():
    g = traced("attrs")
    text = str(g)
    node_lines = [ln for ln in text.splitlines() if re.match(r"\s+%\d+:", ln)]
    assert len(node_lines) == len(g.nodes)
    for ln, n in zip(node_lines, g.nodes, strict=True):
        assert ln.strip().startswith(f"%{n.id}:")
        assert f" = {n.op}" in ln
    assert "value=-1.5" in text
    assert "dtype=float32" in text
    assert re.search(r"reduce_max\[axes=\(0,2\) keepdims=True\]", text)
    assert re.search(r"cumsum\[axis=1 reverse=True\]", text)
    assert "i64[3]" in text and "bool[4]" in text and "f32[4]" in text
    assert re.search(r"switch\[branches=\{graph:[0-9a-f]{12},graph:[0-9a-f]{12}\} select=\(0,\)\]", text)
    assert re.search(r"in \(out\.m=%\d+, out\.total=%\d+, out\.chosen=%\d+\) \}$", text)


# ---------------------------------------------------------------- bad graphs from the wire


def test_base_graph_is_valid():
    g = Graph.from_proto(base_msg())
    assert g.id == base_graph().id
    ir.validate(g)


def test_unknown_op():
    msg = base_msg()
    node(msg, 3).op = "sine"
    raises(msg, "unknown op", "'sine'", "%3")


def test_forward_reference():
    msg = base_msg()
    node(msg, 4).inputs[1] = 5
    raises(msg, "%4", "mul", "%5", "used before it is defined")


def test_self_cycle():
    msg = base_msg()
    node(msg, 3).inputs[0] = 3
    raises(msg, "%3", "sin", "operand %3", "used before it is defined")


def test_two_node_cycle():
    msg = base_msg()
    node(msg, 3).inputs[0] = 4  # %3 = sin %4, %4 = mul %3 %1
    raises(msg, "%3", "sin", "operand %4", "used before it is defined")


def test_operand_far_out_of_range():
    msg = base_msg()
    node(msg, 6).inputs[1] = 2**32 - 1
    raises(msg, "%6", "add", f"%{2**32 - 1}", "used before it is defined")


def test_out_of_order_node_id():
    msg = base_msg()
    node(msg, 4).id = 9
    raises(msg, "%9", "mul", "out of order", "expected 4")


def test_duplicate_node_id():
    msg = base_msg()
    node(msg, 4).id = 3
    raises(msg, "%3", "mul", "out of order", "expected 4")


def test_input_id_out_of_order():
    msg = base_msg()
    msg.inputs[1].id = 0
    raises(msg, "input 'y'", "id 0", "expected 1")


def test_wrong_arity():
    msg = base_msg()
    node(msg, 3).inputs.append(1)
    raises(msg, "%3", "sin", "takes 1 operands", "got 2")


def test_variadic_op_with_no_operands():
    msg = base_msg()
    n = node(msg, 3)
    n.op = "concatenate"
    del n.inputs[:]
    n.attrs["axis"].i = 0
    raises(msg, "%3", "concatenate", "at least 1", "got 0")


def test_missing_attribute():
    msg = base_msg()
    del node(msg, 5).attrs["keepdims"]
    raises(msg, "%5", "reduce_sum", "keepdims", "do not match")


def test_extra_attribute():
    msg = base_msg()
    node(msg, 3).attrs["axis"].i = 0
    raises(msg, "%3", "sin", "axis", "do not match")


def test_wrong_attribute_kind():
    msg = base_msg()
    node(msg, 5).attrs["keepdims"].i = 0
    raises(msg, "%5", "reduce_sum", "keepdims=0", "not of kind bool")


def test_attribute_float_list_for_ints():
    msg = base_msg()
    node(msg, 5).attrs["axes"].floats.values[:] = [0.0]
    raises(msg, "%5", "reduce_sum", "axes=(0.0,)", "not of kind ints")


def test_attribute_unknown_dtype_name():
    msg = base_msg()
    n = node(msg, 3)
    n.op = "cast"
    n.attrs["dtype"].s = "complex128"
    raises(msg, "%3", "cast", "complex128", "not of kind dtype")


def test_attribute_without_value():
    msg = base_msg()
    node(msg, 5).attrs["keepdims"].Clear()
    raises(msg, "%5", "reduce_sum", "'keepdims'", "no value")


def test_declared_shape_disagrees_with_inferred():
    msg = base_msg()
    node(msg, 3).shape[:] = [4]
    raises(msg, "%3", "sin", "declared type f64[4]", "gives f64[3]", exc=gs.ShapeError)


def test_declared_dtype_disagrees_with_inferred():
    msg = base_msg()
    node(msg, 5).dtype = pb.FLOAT32
    raises(msg, "%5", "reduce_sum", "declared type f32[]", "gives f64[]", exc=gs.ShapeError)


def test_operand_dtypes_disagree():
    msg = base_msg()
    msg.constants[0].value.CopyFrom(tensor_to_proto(np.float32(2.0)))  # %6 = add f64 f32
    raises(msg, "%6", "add", "float64", "float32", "different dtypes", exc=gs.ShapeError)


def test_operand_shapes_do_not_broadcast():
    msg = base_msg()
    msg.inputs[1].shape[:] = [4]  # %4 = mul f64[3] f64[4]
    raises(msg, "%4", "mul", "(3,)", "(4,)", "do not broadcast", exc=gs.ShapeError)


def test_negative_dimension_of_input():
    msg = base_msg()
    msg.inputs[0].shape[:] = [-3]
    raises(msg, "input 'x'", "negative dimension", "[-3]")


def test_negative_dimension_of_node():
    msg = base_msg()
    node(msg, 4).shape[:] = [-3]
    raises(msg, "%4", "mul", "negative dimension", "[-3]")


def test_negative_dimension_of_constant():
    msg = base_msg()
    msg.constants[0].value.shape[:] = [-1]
    raises(msg, "constant %2", "negative dimension")


def _peak_during(fn) -> int:
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("where, shape", [
    ("input", [10**12]),
    ("input", [10**6, 10**6]),
    ("input", [2**62, 2**62, 4]),  # element count overflows int64
    ("node", [10**12]),
    ("node", [2**31, 2**31, 2**31]),
    ("constant", [10**12]),
])
def test_huge_shape_is_refused_before_allocating(where, shape):
    msg = base_msg()
    if where == "input":
        msg.inputs[0].shape[:] = shape
        fragments = ["input 'x'"]
    elif where == "node":
        node(msg, 3).shape[:] = shape
        fragments = ["%3", "sin"]
    else:
        msg.constants[0].value.shape[:] = shape
        fragments = ["constant %2"]
    errors = []

    def decode():
        try:
            Graph.from_proto(msg)
        except gs.GraphError as e:
            errors.append(str(e))

    peak = _peak_during(decode)
    assert len(errors) == 1, "a 10^12-element shape was accepted"
    for f in [*fragments, "more than", str(ir.DEFAULT_LIMITS.max_elements)]:
        assert f in errors[0]
    assert peak < 1 << 20, f"decoding allocated {peak} bytes before refusing"


def test_huge_shape_refused_even_with_a_generous_element_limit():
    limits = Limits(max_elements=2**63 - 1)
    msg = base_msg()
    node(msg, 3).shape[:] = [2**31, 2**31, 2**31]  # 2**93 elements: beyond int64
    errors = []

    def decode():
        try:
            Graph.from_proto(msg, limits=limits)
        except gs.GraphError as e:
            errors.append(str(e))

    assert _peak_during(decode) < 1 << 20
    assert len(errors) == 1 and "%3" in errors[0] and "more than" in errors[0]
    # a constant that claims 2**40 elements but carries no data: refused by its byte count, nothing allocated
    msg = base_msg()
    msg.constants[0].value.shape[:] = [2**40]
    errors.clear()
    assert _peak_during(decode) < 1 << 20
    assert len(errors) == 1 and "constant %2" in errors[0] and f"needs {2**40 * 8} bytes" in errors[0]


def test_rank_over_limit():
    msg = base_msg()
    msg.inputs[0].shape[:] = [1] * 40
    raises(msg, "input 'x'", "rank 40")


def test_over_max_nodes():
    raises(base_msg(), "4 nodes", "limit of 3", limits=Limits(max_nodes=3))
    assert len(Graph.from_proto(base_msg(), limits=Limits(max_nodes=4)).nodes) == 4


def test_constant_byte_length_disagrees_with_shape():
    msg = base_msg()
    msg.constants[0].value.data = msg.constants[0].value.data[:-1]
    raises(msg, "constant %2", "f64[]", "needs 8 bytes", "got 7")
    msg = base_msg()
    msg.constants[0].value.shape[:] = [2]
    raises(msg, "constant %2", "f64[2]", "needs 16 bytes", "got 8")


def test_constant_over_max_constant_bytes():
    msg = base_msg()
    # the constant that crosses the limit should be named, like every other constant problem
    raises(msg, "constant %2", "limit of 4 bytes", limits=Limits(max_constant_bytes=4))
    assert Graph.from_proto(msg, limits=Limits(max_constant_bytes=8)).constants[0] == 2.0


def test_constant_id_out_of_order():
    msg = base_msg()
    msg.constants[0].id = 5
    raises(msg, "constant", "id 5", "expected 2")


@pytest.mark.parametrize("where", ["input", "constant", "node"])
@pytest.mark.parametrize("code", [0, 6, 17])
def test_unknown_dtype_code(where, code):
    msg = base_msg()
    if where == "input":
        msg.inputs[1].dtype = code
        fragments = ["input 'y'"]
    elif where == "constant":
        msg.constants[0].value.dtype = code
        fragments = ["constant %2"]
    else:
        node(msg, 4).dtype = code
        fragments = ["%4", "mul"]
    raises(msg, *fragments, f"unknown dtype code {code}")


def test_output_refers_to_undefined_id():
    msg = base_msg()
    msg.outputs[0].id = 7
    raises(msg, "output 'out'", "%7", "does not define")


def test_duplicate_input_names():
    msg = base_msg()
    msg.inputs[1].name = "x"
    raises(msg, "duplicate input names", "'x'")


def test_duplicate_output_names():
    msg = base_msg()
    msg.outputs[1].name = "out"
    raises(msg, "duplicate output names", "'out'")


def test_no_outputs():
    msg = base_msg()
    del msg.outputs[:]
    raises(msg, "no outputs")


def test_error_type_is_shape_error_only_for_type_problems():
    msg = base_msg()
    node(msg, 3).op = "sine"
    with pytest.raises(gs.GraphError) as info:
        Graph.from_proto(msg)
    assert not isinstance(info.value, gs.ShapeError)
    assert issubclass(gs.ShapeError, gs.GraphError)


@pytest.mark.parametrize("problem", ["dangling output", "misnumbered node"])
def test_validate_checks_ids_of_a_graph_built_in_memory(problem):
    """`validate` is public ("check a graph from outside"): ids must be checked there too, not only in from_proto."""
    g = base_graph()
    if problem == "dangling output":
        g.outputs = [("out", 99)]
        fragment = "%99"
    else:
        n = g.nodes[1]
        g.nodes[1] = Node(9, n.op, (3, 8), n.attrs, n.dtype, n.shape)
        fragment = "%9"
    with pytest.raises(gs.GraphError) as info:
        ir.validate(g)
    assert fragment in str(info.value)


def test_validate_on_in_memory_graph_catches_bad_node():
    g = Graph([Input(0, "x", "float64", (3,))], [], [Node(1, "sin", (0,), {}, "float64", (4,))], [("o", 1)])
    with pytest.raises(gs.ShapeError, match=r"declared type f64\[4\] but sin gives f64\[3\] at %1"):
        ir.validate(g)


# ---------------------------------------------------------------- generated stubs


def test_checked_in_stubs_are_fresh():
    r = subprocess.run([sys.executable, "proto/generate.py", "--check"], cwd=ROOT, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------- tensors on the wire

SHAPES = [(), (0,), (2, 0, 3), (5,), (2, 3)]


def sample(dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    n = int(np.prod(shape))
    if dtype == "bool":
        return (np.arange(n) % 3 == 0).reshape(shape)
    if dtype in ("float32", "float64"):
        return (np.arange(n) * -1.25 + 0.5).astype(dtype).reshape(shape)
    info = np.iinfo(dtype)
    vals = np.array([info.min, -1, 0, 1, info.max] * (n // 5 + 1), dtype=dtype)[:n]
    return vals.reshape(shape)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES)
def test_tensor_round_trip(dtype, shape):
    a = sample(dtype, shape)
    msg = tensor_to_proto(a)
    assert msg.dtype == PB_DTYPE[dtype]
    assert tuple(msg.shape) == shape
    assert msg.data == a.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    assert len(msg.data) == a.size * a.itemsize
    b = tensor_from_proto(pb.Tensor.FromString(msg.SerializeToString()))
    assert b.dtype == np.dtype(dtype) and b.dtype.isnative
    assert b.shape == shape
    assert np.array_equal(a, b)
    assert b.tobytes() == a.tobytes()


@pytest.mark.parametrize("dtype", DTYPES)
def test_tensor_non_contiguous_input(dtype):
    a = sample(dtype, (4, 6))
    for view in (a[:, ::2], a.T, a[::-1, 1:5:3], np.broadcast_to(a[0], (3, 6))):
        assert not view.flags.c_contiguous
        msg = tensor_to_proto(view)
        assert tuple(msg.shape) == view.shape
        assert msg.data == np.ascontiguousarray(view).astype(np.dtype(dtype).newbyteorder("<")).tobytes()
        assert np.array_equal(tensor_from_proto(msg), view)


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != "bool"])
def test_tensor_big_endian_input_goes_out_little_endian(dtype):
    a = sample(dtype, (2, 3))
    big = a.astype(np.dtype(dtype).newbyteorder(">"))
    assert big.dtype.byteorder == ">" and big.tobytes() != a.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    msg = tensor_to_proto(big)
    assert msg.dtype == PB_DTYPE[dtype]
    assert msg.data == a.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    back = tensor_from_proto(msg)
    assert back.dtype == np.dtype(dtype) and back.dtype.isnative
    assert np.array_equal(back, a)
    # a non-contiguous big-endian view too, and a 0-d one
    msg = tensor_to_proto(big.T)
    assert np.array_equal(tensor_from_proto(msg), a.T)
    assert tensor_from_proto(tensor_to_proto(big[1, 2])) == a[1, 2]


def test_tensor_known_bytes():
    assert tensor_to_proto(np.array([1, 256], dtype=">i4")).data == bytes([1, 0, 0, 0, 0, 1, 0, 0])
    assert tensor_to_proto(np.float64(1.0)).data == bytes.fromhex("000000000000f03f")
    assert tensor_to_proto(np.array([[True], [False]])).data == b"\x01\x00"


def test_tensor_from_proto_rejects_bad_messages():
    msg = tensor_to_proto(np.arange(3.0))
    msg.data = msg.data[:-1]
    with pytest.raises(gs.GraphError, match=r"where-am-i: f64\[3\] needs 24 bytes, got 23"):
        tensor_from_proto(msg, where="where-am-i")
    msg = tensor_to_proto(np.arange(3.0))
    msg.dtype = 9
    with pytest.raises(gs.GraphError, match="unknown dtype code 9"):
        tensor_from_proto(msg)
    msg = tensor_to_proto(np.arange(3.0))
    msg.shape[:] = [10**12]
    with pytest.raises(gs.GraphError, match="more than"):
        tensor_from_proto(msg)
    with pytest.raises(gs.GraphError, match="more than 2 elements"):
        tensor_from_proto(tensor_to_proto(np.arange(3.0)), Limits(max_elements=2))


@pytest.mark.parametrize("a", [np.arange(3, dtype=np.uint8), np.ones(2, dtype=np.complex128), np.ones(2, dtype=np.float16)],
                         ids=lambda a: a.dtype.name)
def test_tensor_to_proto_refuses_unsupported_dtypes(a):
    with pytest.raises(TypeError, match=a.dtype.name):
        tensor_to_proto(a)
