"""Higher-order primitives: ops whose attributes hold subgraphs (kind "graphs"), as JAX's
`lax.cond`, `lax.scan` and `custom_vjp` carry jaxprs. Graphs are data, so control flow and
user-defined derivative rules travel to the server like any other node; no Python crosses.

Every node defines one value, so a higher-order op that yields several results yields those
of one dtype packed: the raveled results listed by its `select` attribute, concatenated into
one vector. The SDK unpacks them with slices and reshapes (`call`), emitting one node per
dtype among the results (a loop whose carries mix float and integer dtypes runs once for
each: the price of single-result nodes, documented in README).

- `switch`: operands (index, *args); `branches` holds one graph per branch, each from the args
  to the same results; only the branch `clip(index, 0, n-1)` runs. VJP: a switch over the
  branches' VJP graphs; JVP: a switch over their JVP graphs.
- `scan`: operands (*init, *xs, *consts); `body` maps (carry..., x..., const...) to
  (carry..., y...); results: the final carries, then each y stacked along a new leading axis.
  VJP: a scan that stacks the carries each step begins with, then a reverse scan of the body's
  VJP graph over them (cotangents of the consts summed in the carry). JVP: a scan of the body's
  JVP graph, tangents carried beside the values.
- `custom_vjp`: operands (*args); `fun` (args -> outs) is what runs; `fwd` (args -> outs,
  residuals) and `bwd` (residuals, output cotangents -> argument cotangents) are the user's
  rule, run by the VJP. Forward mode is refused, as JAX does.
- `custom_jvp`: operands (*args); `fun` runs; `jvp` maps (args..., a tangent per float arg) to
  (outs..., a tangent per float out), the user's rule, run by the JVP; the VJP transposes it (its
  reverse mode with respect to the tangents, which it is linear in), as JAX does.
- `while`: operands (*init, *consts); `cond` maps (carry..., const...) to a bool scalar, `body` to
  the new carries; results: the final carries. JVP: a while over the body's JVP graph. Reverse
  mode is refused, as JAX does (the step count is not known before it runs).

The rules of these ops transform their subgraphs with the engine's own transforms, which
`autodiff` hands over when it is imported (`use_transforms`): the registry sits below it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import ModuleType
from typing import Any

import numpy as np

from ..errors import GraphError, ShapeError
from ..guard import poller
from ..ir import Builder, Graph, Var, replay, type_str
from ..names import fresh
from .core import FLOATS, PRIMITIVES, AVal, Primitive, register
from .emit import bind, reshape, zeros
from .sharding import shard_refused, sum_refused

# the transforms the rules apply to subgraphs: set by `autodiff` at import (see `use_transforms`)
_AD: dict[str, Callable[..., Any]] = {}


def use_transforms(**transforms: Callable[..., Any]) -> None:
    """Called once by `autodiff`: vjp_graph, vjp_names, jvp_graph."""
    _AD.update(transforms)


# ---------------------------------------------------------------- evaluation of a subgraph


class _Interpreter:
    """Runs a subgraph node by node with the kernels over one array namespace."""

    def __init__(self, xp: ModuleType):
        self.xp = xp
        self.kernels: dict[str, Callable[..., Any]] = {}

    def kernel(self, op: str) -> Callable[..., Any]:
        k = self.kernels.get(op)
        if k is None:
            k = self.kernels[op] = PRIMITIVES[op].kernel(self.xp)
        return k

    def run(self, graph: Graph, args: Sequence[Any]) -> list[Any]:
        """The outputs of `graph` on `args`; each value is dropped after its last use."""
        xp = self.xp
        env: list[Any] = list(args) + [c if xp is np else xp.asarray(c) for c in graph.constants]
        dying = _dying(graph)
        poll = poller("while running a subgraph")
        for k, n in enumerate(graph.nodes):
            poll()
            env.append(self.kernel(n.op)(*(env[i] for i in n.inputs), **n.attrs))
            for i in dying[k]:
                env[i] = None
        return [env[vid] for _, vid in graph.outputs]

    def pack(self, results: Sequence[Any], select: Sequence[int], dtype: str) -> Any:
        xp = self.xp
        parts = [xp.ravel(xp.asarray(results[k])) for k in select]
        return xp.concatenate(parts).astype(dtype, copy=False) if len(parts) > 1 else parts[0].astype(dtype, copy=True)


def _dying(graph: Graph) -> list[tuple[int, ...]]:
    """For each node of `graph`, the values whose last use it is (never an output); kept on the graph."""
    got = graph.memo.get("dying")
    if got is None:
        got = graph.memo["dying"] = _last_uses(graph)
    return got


def _last_uses(graph: Graph) -> list[tuple[int, ...]]:
    last: dict[int, int] = {}
    for k, n in enumerate(graph.nodes):
        for i in n.inputs:
            last[i] = k
    kept = {vid for _, vid in graph.outputs}
    dying: list[list[int]] = [[] for _ in graph.nodes]
    for i, k in last.items():
        if i not in kept:
            dying[k].append(i)
    return [tuple(d) for d in dying]


def _nbytes(aval: AVal) -> int:
    return math.prod(aval[1]) * np.dtype(aval[0]).itemsize


def graph_bytes_held(graph: Graph) -> int:
    """The most bytes a run of `graph` holds besides its inputs (which its caller holds): its
    constants, each value from its node to its last use, and what nested subgraphs hold."""
    dying = _dying(graph)
    live = sum(c.nbytes for c in graph.constants)
    peak = live
    for k, n in enumerate(graph.nodes):
        live += _nbytes((n.dtype, n.shape))
        scratch = PRIMITIVES[n.op].scratch
        peak = max(peak, live + (scratch(n.attrs) if scratch is not None else 0))
        live -= sum(_nbytes(graph.aval(i)) for i in dying[k] if i >= graph.first_node_id)
    return peak


# ---------------------------------------------------------------- packed results


def out_avals(graph: Graph) -> list[AVal]:
    return [graph.aval(vid) for _, vid in graph.outputs]


def in_avals(graph: Graph) -> list[AVal]:
    return [(i.dtype, i.shape) for i in graph.inputs]


def _packed(results: Sequence[AVal], select: tuple[int, ...], what: str) -> AVal:
    """The type of the vector packing `results[k]` for k in `select` (one dtype)."""
    if not select:
        raise ShapeError(f"{what}: select is empty; a node yields at least one result")
    if len(set(select)) != len(select) or not all(0 <= k < len(results) for k in select):
        raise ShapeError(f"{what}: select {select} must list distinct results among {len(results)}")
    dtypes = {results[k][0] for k in select}
    if len(dtypes) != 1:
        raise ShapeError(f"{what}: selected results mix dtypes {sorted(dtypes)}; a node packs one dtype")
    return dtypes.pop(), (sum(math.prod(results[k][1]) for k in select),)


def _same(got: Sequence[AVal], want: Sequence[AVal], what: str) -> None:
    if [(d, tuple(s)) for d, s in got] != [(d, tuple(s)) for d, s in want]:
        raise ShapeError(f"{what}: ({', '.join(type_str(*a) for a in got)}) "
                         f"does not match ({', '.join(type_str(*a) for a in want)})")


def unpack(v: Var, results: Sequence[AVal], select: Sequence[int], lead: tuple[int, ...] = ()) -> dict[int, Var]:
    """The results a packed value `v` (shape lead + (n,)) holds, by position in `results`. Of
    several, each is copied out (a cast to its own dtype), so that a long-lived one (a weight's
    gradient) does not keep the whole vector alive as a view would."""
    out, start, nl = {}, 0, len(lead)
    for k in select:
        shape = results[k][1]
        size = math.prod(shape)
        if (start, size) == (0, v.shape[-1]):
            piece = v
        else:
            piece = bind("slice", v, starts=(0,) * nl + (start,), stops=(*lead, start + size), steps=(1,) * (nl + 1))
            piece = bind("cast", piece, dtype=piece.dtype)
        out[k] = reshape(piece, lead + tuple(shape))
        start += size
    return out


def call(op: str, operands: Sequence[Var], results: Sequence[AVal], want: Iterable[int] | None = None,
         **attrs: Any) -> list[Var]:
    """Bind higher-order `op` and return its results (those in `want`, default all, in that
    order): one node per dtype among them."""
    want = list(range(len(results)) if want is None else want)
    by_dtype: dict[str, list[int]] = {}
    for k in want:
        by_dtype.setdefault(results[k][0], []).append(k)
    got: dict[int, Var] = {}
    for select in by_dtype.values():
        got.update(unpack(bind(op, *operands, select=tuple(select), **attrs), results, select))
    return [got[k] for k in want]


def call_graph(graph: Graph, args: Sequence[Var]) -> list[Var]:
    """The results of `graph` on `args`, as one node (a switch of one branch)."""
    index = args[0].builder.const(np.zeros((), np.int32))
    return call("switch", [index, *args], out_avals(graph), branches=(graph,))


def permute(graph: Graph, inputs: Sequence[int], outputs: Sequence[int]) -> Graph:
    """`graph` with its inputs declared in the order `inputs` and the outputs `outputs`."""
    b = Builder()
    env: dict[int, Var] = {}
    for j in inputs:
        i = graph.inputs[j]
        env[i.id] = b.input(i.name, i.dtype, i.shape)
    replay(graph, b, env)
    return b.build([(graph.outputs[k][0], env[graph.outputs[k][1]]) for k in outputs])


def vjp_of(graph: Graph, wrt: Sequence[int], outs: Sequence[int], batch: tuple[int, ...] = ()) -> Graph:
    """The VJP of `graph` as a graph of (its inputs..., a seed per output in `outs`) to the
    cotangent of each input in `wrt`: the same signature whatever the graph depends on."""
    names = [graph.inputs[j].name for j in wrt]
    onames = [graph.outputs[k][0] for k in outs]
    inner = _AD["vjp_graph"](graph, names, onames, batch=batch, keep_outputs=False)
    named = _AD["vjp_names"](graph, names, onames, keep_outputs=False)
    b = Builder()
    by_name = {i.name: b.input(i.name, i.dtype, i.shape) for i in graph.inputs}
    for o, (dtype, shape) in zip(onames, (out_avals(graph)[k] for k in outs), strict=True):
        by_name[named.seed[o]] = b.input(named.seed[o], dtype, batch + tuple(shape))
    env = {i.id: by_name[i.name] for i in inner.inputs}
    replay(inner, b, env)
    grads = dict(inner.outputs)
    return b.build([(named.grad[x], env[grads[named.grad[x]]]) for x in names])


def jvp_of(graph: Graph, wrt: Sequence[int]) -> Graph:
    """The JVP of `graph`: (its inputs..., a tangent per input in `wrt`) to (its outputs..., a
    tangent per float output)."""
    return _AD["jvp_graph"](graph, [graph.inputs[j].name for j in wrt])


def graph_flops(graph: Graph) -> float:
    """The cost model's operation count of running `graph` once."""
    return float(sum(PRIMITIVES[n.op].flops([graph.aval(i) for i in n.inputs], (n.dtype, n.shape), n.attrs)
                     for n in graph.nodes))


def _scratch_switch(attrs: Mapping[str, Any]) -> int:
    return max(graph_bytes_held(g) for g in attrs["branches"])


def _scratch_scan(attrs: Mapping[str, Any]) -> int:  # the body's run, and the ys stacked before they are packed
    (g,) = attrs["body"]
    ys = _scan_results(g, attrs["n_carry"], attrs["length"])[attrs["n_carry"]:]
    return graph_bytes_held(g) + sum(map(_nbytes, ys))


def _scratch_custom_vjp(attrs: Mapping[str, Any]) -> int:
    return graph_bytes_held(attrs["fun"][0])


def _scratch_while(attrs: Mapping[str, Any]) -> int:
    return max(graph_bytes_held(attrs["cond"][0]), graph_bytes_held(attrs["body"][0]))


def _flops_switch(ins: Sequence[AVal], out: AVal, attrs: Mapping[str, Any]) -> float:
    return max(graph_flops(g) for g in attrs["branches"])  # the dearest branch: the model plans for it


def _flops_scan(ins: Sequence[AVal], out: AVal, attrs: Mapping[str, Any]) -> float:
    return attrs["length"] * graph_flops(attrs["body"][0])


def _flops_custom_vjp(ins: Sequence[AVal], out: AVal, attrs: Mapping[str, Any]) -> float:
    return graph_flops(attrs["fun"][0])


def _avals(vs: Sequence[Var]) -> list[AVal]:
    return [(v.dtype, v.shape) for v in vs]


def _floats(avals: Sequence[AVal]) -> list[int]:
    return [k for k, (dtype, _shape) in enumerate(avals) if dtype in FLOATS]


def _ct_or_zeros(pieces: dict[int, Var], k: int, aval: AVal, lead: tuple[int, ...], like: Var) -> Var:
    return pieces[k] if k in pieces else zeros(lead + tuple(aval[1]), aval[0], like)


# ---------------------------------------------------------------- switch


def _switch_rule(index: AVal, *args: AVal, branches: tuple[Graph, ...], select: tuple[int, ...]) -> AVal:
    if index[0] != "int32" or index[1] != ():
        raise ShapeError(f"switch index must be an int32 scalar, got {type_str(*index)}")
    results = out_avals(branches[0])
    for k, g in enumerate(branches):
        _same(list(args), in_avals(g), f"switch operands and the inputs of branch {k}")
        _same(out_avals(g), results, f"switch: the results of branch {k} and of branch 0")
    return _packed(results, select, "switch")


def _switch_kernel(xp: ModuleType) -> Callable[..., Any]:
    run = _Interpreter(xp)

    def kernel(index: Any, *args: Any, branches: tuple[Graph, ...], select: tuple[int, ...]) -> Any:
        g = branches[min(max(int(index), 0), len(branches) - 1)]
        results = run.run(g, args)
        return run.pack(results, select, g.aval(g.outputs[select[0]][1])[0])

    return kernel


def _switch_vjp(ct: Var, index: Var, *args: Var, out: Var, need: Sequence[bool], nb: int,
                branches: tuple[Graph, ...], select: tuple[int, ...]) -> list[Var | None]:
    results = out_avals(branches[0])
    lead = tuple(ct.shape[:nb])
    seeds = unpack(ct, results, select, lead)
    wrt = [j for j, a in enumerate(args) if need[1 + j] and a.dtype in FLOATS]
    if not wrt:
        return [None] * (1 + len(args))
    vjps = tuple(vjp_of(g, wrt, select, lead) for g in branches)
    grads = call("switch", [index, *args, *(seeds[k] for k in select)], out_avals(vjps[0]), branches=vjps)
    got = dict(zip(wrt, grads, strict=True))
    return [None] + [got.get(j) for j in range(len(args))]


def _switch_jvp(ts: Sequence[Var | None], index: Var, *args: Var, out: Var,
                branches: tuple[Graph, ...], select: tuple[int, ...]) -> Var:
    tangents = {j: t for j, t in enumerate(ts[1:]) if t is not None and args[j].dtype in FLOATS}
    jvps = tuple(jvp_of(g, list(tangents)) for g in branches)
    results = out_avals(branches[0])
    floats = _floats(results)
    tan_select = tuple(len(results) + floats.index(k) for k in select)
    return bind("switch", index, *args, *tangents.values(), branches=jvps, select=tan_select)


register(Primitive(
    "switch", None, {"branches": "graphs", "select": "ints"}, _switch_rule, _switch_kernel,
    vjp=_switch_vjp, jvp=_switch_jvp, flops=_flops_switch, scratch=_scratch_switch, shard=shard_refused,
    shard_sum=sum_refused))


# ---------------------------------------------------------------- scan


def _scan_results(body: Graph, n_carry: int, length: int) -> list[AVal]:
    outs = out_avals(body)
    return outs[:n_carry] + [(d, (length, *s)) for d, s in outs[n_carry:]]


def _scan_rule(*ops: AVal, body: tuple[Graph, ...], n_carry: int, n_xs: int, length: int, reverse: bool,
               select: tuple[int, ...]) -> AVal:
    (g,) = body if len(body) == 1 else (None,)
    if g is None:
        raise ShapeError(f"scan takes one body graph, got {len(body)}")
    if min(n_carry, n_xs, length) < 0 or n_carry + n_xs > len(ops):
        raise ShapeError(f"scan: n_carry={n_carry}, n_xs={n_xs}, length={length} do not fit {len(ops)} operands")
    carry, xs, consts = ops[:n_carry], ops[n_carry:n_carry + n_xs], ops[n_carry + n_xs:]
    for k, (dtype, shape) in enumerate(xs):
        if not shape or shape[0] != length:
            raise ShapeError(f"scan: xs[{k}] of type {type_str(dtype, shape)} has no leading axis of length {length}")
    _same([*carry, *((d, s[1:]) for d, s in xs), *consts], in_avals(g), "scan operands (one x each step) and the body's inputs")
    outs = out_avals(g)
    if len(outs) < n_carry:
        raise ShapeError(f"scan: the body has {len(outs)} outputs, fewer than its {n_carry} carries")
    _same(outs[:n_carry], list(carry), "scan: the body's new carries and the carries")
    return _packed(_scan_results(g, n_carry, length), select, "scan")


def _scan_kernel(xp: ModuleType) -> Callable[..., Any]:
    run = _Interpreter(xp)

    def kernel(*ops: Any, body: tuple[Graph, ...], n_carry: int, n_xs: int, length: int, reverse: bool,
               select: tuple[int, ...]) -> Any:
        (g,) = body
        carry, xs, consts = list(ops[:n_carry]), ops[n_carry:n_carry + n_xs], list(ops[n_carry + n_xs:])
        results = _scan_results(g, n_carry, length)
        ys = {k: xp.empty(results[k][1], results[k][0]) for k in select if k >= n_carry}
        poll = poller("while running a scan")
        for t in reversed(range(length)) if reverse else range(length):
            poll()
            step = run.run(g, [*carry, *(x[t] for x in xs), *consts])
            carry = step[:n_carry]
            for k, y in ys.items():
                y[t] = step[k]
        return run.pack([*carry, *(ys.get(k) for k in range(n_carry, len(results)))], select, results[select[0]][0])

    return kernel


def _moveaxis(v: Var, src: int, dst: int) -> Var:
    perm = list(range(v.ndim))
    perm.insert(dst, perm.pop(src))
    return v if perm == sorted(perm) else bind("transpose", v, perm=tuple(perm))


def _scan_vjp(ct: Var, *ops: Var, out: Var, need: Sequence[bool], nb: int, body: tuple[Graph, ...], n_carry: int,
              n_xs: int, length: int, reverse: bool, select: tuple[int, ...]) -> list[Var | None]:
    (g,) = body
    nc, nx, nk = n_carry, n_xs, len(ops) - n_carry - n_xs
    results = _scan_results(g, nc, length)
    lead = tuple(ct.shape[:nb])
    pieces = unpack(ct, results, select, lead)
    fc = _floats(results[:nc])  # float carries: their cotangents flow back through every step
    fy = [k - nc for k in _floats(results) if k >= nc]
    fx = [j for j in _floats(_avals(ops[nc:nc + nx])) if need[nc + j]]
    fk = [j for j in _floats(_avals(ops[nc + nx:])) if need[nc + nx + j]]
    if not fc and not fx and not fk:
        return [None] * len(ops)
    # 1. the carry each step begins with, stacked: the residuals of the backward scan
    b = Builder()
    env: dict[int, Var] = {}
    for i in g.inputs:
        env[i.id] = b.input(i.name, i.dtype, i.shape)
    replay(g, b, env)
    taken = set(g.output_names())
    stacking = b.build([(name, env[vid]) for name, vid in g.outputs[:nc]]
                       + [(fresh(f"%carry{k}", taken), env[g.inputs[k].id]) for k in range(nc)])
    saved = call("scan", list(ops), _scan_results(stacking, nc, length), want=range(nc, 2 * nc), body=(stacking,),
                 n_carry=nc, n_xs=nx, length=length, reverse=reverse)
    # 2. the backward body: (ct carries, ct consts summed; carry, x, ct y; consts) -> (new cts; ct x)
    wrt = fc + [nc + j for j in fx] + [nc + nx + j for j in fk]
    v = vjp_of(g, wrt, fc + [nc + j for j in fy], lead)
    b = Builder()
    cin = [b.input(f"%ctc{k}", results[k][0], lead + results[k][1]) for k in fc]
    acc = [b.input(f"%acc{j}", ops[nc + nx + j].dtype, lead + ops[nc + nx + j].shape) for j in fk]
    c_t = [b.input(f"%c{k}", *in_avals(g)[k]) for k in range(nc)]
    x_t = [b.input(f"%x{j}", *in_avals(g)[nc + j]) for j in range(nx)]
    cy_t = [b.input(f"%cty{j}", results[nc + j][0], lead + results[nc + j][1][1:]) for j in fy]
    k_in = [b.input(f"%k{j}", *in_avals(g)[nc + nx + j]) for j in range(nk)]
    env = dict(enumerate([*c_t, *x_t, *k_in, *cin, *cy_t]))
    replay(v, b, env)
    grads = [env[vid] for _, vid in v.outputs]
    gc, gx, gk = grads[:len(fc)], grads[len(fc):len(fc) + len(fx)], grads[len(fc) + len(fx):]
    new_acc = [bind("add", a, d) for a, d in zip(acc, gk, strict=True)]
    back = b.build([(f"%ctc{k}", x) for k, x in zip(fc, gc, strict=True)]
                   + [(f"%acc{j}", x) for j, x in zip(fk, new_acc, strict=True)]
                   + [(f"%ctx{j}", x) for j, x in zip(fx, gx, strict=True)])
    # 3. the reverse scan; stacked cotangents travel with time first
    time = nb  # where the time axis of a stacked value's cotangent sits
    init = [_ct_or_zeros(pieces, k, results[k], lead, ct) for k in fc]
    init += [zeros(lead + ops[nc + nx + j].shape, ops[nc + nx + j].dtype, ct) for j in fk]
    ys_ct = [_moveaxis(_ct_or_zeros(pieces, nc + j, results[nc + j], lead, ct), time, 0) for j in fy]
    n_back = len(fc) + len(fk)
    back_results = _scan_results(back, n_back, length)
    got = call("scan", [*init, *saved, *ops[nc:nc + nx], *ys_ct, *ops[nc + nx:]], back_results, body=(back,),
               n_carry=n_back, n_xs=nc + nx + len(fy), length=length, reverse=not reverse)
    cts: dict[int, Var] = dict(zip(fc, got[:len(fc)], strict=True))
    cts.update({nc + nx + j: x for j, x in zip(fk, got[len(fc):n_back], strict=True)})
    cts.update({nc + j: _moveaxis(x, 0, time) for j, x in zip(fx, got[n_back:], strict=True)})
    return [cts.get(j) if need[j] else None for j in range(len(ops))]


def _scan_jvp(ts: Sequence[Var | None], *ops: Var, out: Var, body: tuple[Graph, ...], n_carry: int, n_xs: int,
              length: int, reverse: bool, select: tuple[int, ...]) -> Var:
    (g,) = body
    nc, nx = n_carry, n_xs
    fc = _floats(in_avals(g)[:nc])  # every float carry carries a tangent: a zero one may not stay zero
    tx = {j: t for j, t in enumerate(ts[nc:nc + nx]) if t is not None and ops[nc + j].dtype in FLOATS}
    tk = {j: t for j, t in enumerate(ts[nc + nx:]) if t is not None and ops[nc + nx + j].dtype in FLOATS}
    ax, ak = list(tx), list(tk)
    j = jvp_of(g, fc + [nc + x for x in ax] + [nc + nx + k for k in ak])
    n_in, n_out = len(g.inputs), len(g.outputs)
    fo = _floats(out_avals(g))  # the JVP graph's tangent outputs, in this order
    tan_in = n_in + len(fc)  # where the tangents of the xs begin among its inputs
    ny = n_out - nc
    fcy = [k for k in fo if k >= nc]
    body_j = permute(j, [*range(nc), *range(n_in, n_in + len(fc)), *range(nc, nc + nx),
                         *range(tan_in, tan_in + len(ax)), *range(nc + nx, n_in), *range(tan_in + len(ax), len(j.inputs))],
                     [*range(nc), *(n_out + fo.index(k) for k in fc), *range(nc, n_out),
                      *(n_out + fo.index(k) for k in fcy)])
    tc = [t if (t := ts[k]) is not None else zeros(ops[k].shape, ops[k].dtype, ops[k]) for k in fc]
    operands = [*ops[:nc], *tc, *ops[nc:nc + nx], *tx.values(), *ops[nc + nx:], *tk.values()]
    # the JVP scan's results: carries, their tangents, ys, the float ys' tangents
    where = {k: nc + fc.index(k) for k in fc} | {k: nc + len(fc) + ny + fcy.index(k) for k in fcy}
    return bind("scan", *operands, body=(body_j,), n_carry=nc + len(fc), n_xs=nx + len(ax), length=length,
                reverse=reverse, select=tuple(where[k] for k in select))


register(Primitive(
    "scan", None, {"body": "graphs", "n_carry": "int", "n_xs": "int", "length": "int", "reverse": "bool",
                   "select": "ints"},
    _scan_rule, _scan_kernel, vjp=_scan_vjp, jvp=_scan_jvp, flops=_flops_scan, scratch=_scratch_scan, shard=shard_refused,
    shard_sum=sum_refused))


# ---------------------------------------------------------------- custom_vjp


def _custom_vjp_rule(*args: AVal, fun: tuple[Graph, ...], fwd: tuple[Graph, ...], bwd: tuple[Graph, ...],
                     select: tuple[int, ...]) -> AVal:
    if (len(fun), len(fwd), len(bwd)) != (1, 1, 1):
        raise ShapeError("custom_vjp takes one graph each for fun, fwd and bwd")
    outs = out_avals(fun[0])
    _same(list(args), in_avals(fun[0]), "custom_vjp operands and the inputs of fun")
    _same(in_avals(fwd[0]), list(args), "custom_vjp: the inputs of fwd and of fun")
    fwd_outs = out_avals(fwd[0])
    _same(fwd_outs[:len(outs)], outs, "custom_vjp: the first outputs of fwd and the outputs of fun")
    cts = [outs[k] for k in _floats(outs)]
    _same(in_avals(bwd[0]), fwd_outs[len(outs):] + cts, "custom_vjp: the inputs of bwd and (fwd's residuals, "
          "a cotangent per float output)")
    _same(out_avals(bwd[0]), [args[k] for k in _floats(args)], "custom_vjp: the outputs of bwd and the float operands")
    return _packed(outs, select, "custom_vjp")


def _custom_vjp_kernel(xp: ModuleType) -> Callable[..., Any]:
    run = _Interpreter(xp)

    def kernel(*args: Any, fun: tuple[Graph, ...], fwd: tuple[Graph, ...], bwd: tuple[Graph, ...],
               select: tuple[int, ...]) -> Any:
        results = run.run(fun[0], args)
        return run.pack(results, select, out_avals(fun[0])[select[0]][0])

    return kernel


def _custom_vjp_vjp(ct: Var, *args: Var, out: Var, need: Sequence[bool], nb: int, fun: tuple[Graph, ...],
                    fwd: tuple[Graph, ...], bwd: tuple[Graph, ...], select: tuple[int, ...]) -> list[Var | None]:
    outs = out_avals(fun[0])
    lead = tuple(ct.shape[:nb])
    pieces = unpack(ct, outs, select, lead)
    residuals = call_graph(fwd[0], args)[len(outs):]
    cts = [_ct_or_zeros(pieces, k, outs[k], lead, ct) for k in _floats(outs)]
    if nb == 0:
        grads = call_graph(bwd[0], [*residuals, *cts])
    else:  # stacked seeds: bwd mapped over them, a scan over the seeds' rows
        m = math.prod(lead)
        rows = [reshape(c, (m, *c.shape[nb:])) for c in cts]
        nr = len(residuals)
        mapped = permute(bwd[0], [*range(nr, len(bwd[0].inputs)), *range(nr)], range(len(bwd[0].outputs)))
        stacked = call("scan", [*rows, *residuals], _scan_results(mapped, 0, m), body=(mapped,), n_carry=0,
                       n_xs=len(rows), length=m, reverse=False)
        grads = [reshape(gk, lead + gk.shape[1:]) for gk in stacked]
    got = dict(zip(_floats(_avals(args)), grads, strict=True))
    return [got.get(j) if need[j] else None for j in range(len(args))]


def _custom_vjp_jvp(ts: Sequence[Var | None], *args: Var, out: Var, **attrs: Any) -> Var:
    raise GraphError("a custom_vjp function cannot be differentiated in forward mode (jvp, jacfwd, or a Hessian "
                     "computed forward-over-reverse): define it with gs.custom_jvp instead, as in JAX")


register(Primitive(
    "custom_vjp", None, {"fun": "graphs", "fwd": "graphs", "bwd": "graphs", "select": "ints"},
    _custom_vjp_rule, _custom_vjp_kernel, vjp=_custom_vjp_vjp, jvp=_custom_vjp_jvp, flops=_flops_custom_vjp,
    scratch=_scratch_custom_vjp,
    shard=shard_refused, shard_sum=sum_refused))


# ---------------------------------------------------------------- while


def _while_rule(*ops: AVal, cond: tuple[Graph, ...], body: tuple[Graph, ...], n_carry: int,
                select: tuple[int, ...]) -> AVal:
    if (len(cond), len(body)) != (1, 1):
        raise ShapeError("while takes one cond graph and one body graph")
    if not 0 <= n_carry <= len(ops):
        raise ShapeError(f"while: n_carry={n_carry} does not fit {len(ops)} operands")
    _same(list(ops), in_avals(cond[0]), "while operands and the inputs of cond")
    _same(list(ops), in_avals(body[0]), "while operands and the inputs of body")
    _same(out_avals(cond[0]), [("bool", ())], "while: the output of cond")
    _same(out_avals(body[0]), list(ops[:n_carry]), "while: the outputs of body and the carries")
    return _packed(list(ops[:n_carry]), select, "while")


def _while_kernel(xp: ModuleType) -> Callable[..., Any]:
    run = _Interpreter(xp)

    def kernel(*ops: Any, cond: tuple[Graph, ...], body: tuple[Graph, ...], n_carry: int,
               select: tuple[int, ...]) -> Any:
        carry, consts = list(ops[:n_carry]), list(ops[n_carry:])
        poll = poller("while running a while loop")
        while bool(run.run(cond[0], [*carry, *consts])[0]):
            poll()
            carry = run.run(body[0], [*carry, *consts])
        return run.pack(carry, select, ops[select[0]].dtype.name)

    return kernel


def _while_vjp(ct: Var, *ops: Var, out: Var, need: Sequence[bool], nb: int, **attrs: Any) -> list[Var | None]:
    raise GraphError("reverse-mode differentiation does not work through a while loop (as in JAX, its number of steps "
                     "is not known before it runs): use gs.fori_loop with concrete bounds or gs.scan, or forward mode "
                     "(gs.jvp)")


def _while_jvp(ts: Sequence[Var | None], *ops: Var, out: Var, cond: tuple[Graph, ...], body: tuple[Graph, ...],
               n_carry: int, select: tuple[int, ...]) -> Var:
    nc = n_carry
    fc = _floats(_avals(ops[:nc]))  # every float carry carries a tangent
    tk = {j: t for j, t in enumerate(ts[nc:]) if t is not None and ops[nc + j].dtype in FLOATS}
    j = jvp_of(body[0], fc + [nc + k for k in tk])
    n_in = len(body[0].inputs)
    fo = _floats(out_avals(body[0]))
    order = [*range(nc), *range(n_in, n_in + len(fc)), *range(nc, n_in), *range(n_in + len(fc), len(j.inputs))]
    body_j = permute(j, order, [*range(nc), *(nc + fo.index(k) for k in fc)])
    b = Builder()  # cond over (carries, their tangents, consts, their tangents): the tangents unread
    env: dict[int, Var] = {}
    c = cond[0]
    declared = [b.input(i.name, i.dtype, i.shape) for i in c.inputs[:nc]]
    for k in fc:
        b.input(f"%tan{k}", *in_avals(c)[k])
    declared += [b.input(i.name, i.dtype, i.shape) for i in c.inputs[nc:]]
    for k in tk:
        b.input(f"%tank{k}", *in_avals(c)[nc + k])
    env.update(enumerate(declared))
    replay(c, b, env)
    cond_j = b.build([(name, env[vid]) for name, vid in c.outputs])
    tc = [t if (t := ts[k]) is not None else zeros(ops[k].shape, ops[k].dtype, ops[k]) for k in fc]
    return bind("while", *ops[:nc], *tc, *ops[nc:], *tk.values(), cond=(cond_j,), body=(body_j,), n_carry=nc + len(fc),
                select=tuple(nc + fc.index(k) for k in select))


def _flops_while(ins: Sequence[AVal], out: AVal, attrs: Mapping[str, Any]) -> float:
    return graph_flops(attrs["cond"][0]) + graph_flops(attrs["body"][0])  # one step: the count is not known


register(Primitive(
    "while", None, {"cond": "graphs", "body": "graphs", "n_carry": "int", "select": "ints"},
    _while_rule, _while_kernel, vjp=_while_vjp, jvp=_while_jvp, flops=_flops_while, scratch=_scratch_while,
    shard=shard_refused,
    shard_sum=sum_refused))


# ---------------------------------------------------------------- custom_jvp


def _custom_jvp_rule(*args: AVal, fun: tuple[Graph, ...], jvp: tuple[Graph, ...], select: tuple[int, ...]) -> AVal:
    if (len(fun), len(jvp)) != (1, 1):
        raise ShapeError("custom_jvp takes one graph each for fun and jvp")
    outs = out_avals(fun[0])
    _same(list(args), in_avals(fun[0]), "custom_jvp operands and the inputs of fun")
    _same(in_avals(jvp[0]), [*args, *(args[k] for k in _floats(args))],
          "custom_jvp: the inputs of jvp and (the operands, a tangent per float operand)")
    _same(out_avals(jvp[0]), [*outs, *(outs[k] for k in _floats(outs))],
          "custom_jvp: the outputs of jvp and (the outputs of fun, a tangent per float output)")
    return _packed(outs, select, "custom_jvp")


def _custom_jvp_kernel(xp: ModuleType) -> Callable[..., Any]:
    run = _Interpreter(xp)

    def kernel(*args: Any, fun: tuple[Graph, ...], jvp: tuple[Graph, ...], select: tuple[int, ...]) -> Any:
        return run.pack(run.run(fun[0], args), select, out_avals(fun[0])[select[0]][0])

    return kernel


def _custom_jvp_jvp(ts: Sequence[Var | None], *args: Var, out: Var, fun: tuple[Graph, ...], jvp: tuple[Graph, ...],
                    select: tuple[int, ...]) -> Var:
    outs = out_avals(fun[0])
    fo = _floats(outs)
    tangents = [t if (t := ts[k]) is not None else zeros(args[k].shape, args[k].dtype, args[k]) for k in _floats(_avals(args))]
    index = args[0].builder.const(np.zeros((), np.int32))
    return bind("switch", index, *args, *tangents, branches=jvp, select=tuple(len(outs) + fo.index(k) for k in select))


def _custom_jvp_vjp(ct: Var, *args: Var, out: Var, need: Sequence[bool], nb: int, fun: tuple[Graph, ...],
                    jvp: tuple[Graph, ...], select: tuple[int, ...]) -> list[Var | None]:
    """The transpose of the user's JVP: its tangent outputs are linear in its tangent inputs, so
    reverse mode through the JVP graph with respect to the tangents (at zero tangents) gives
    the cotangents of the operands, as JAX's transposition does."""
    outs = out_avals(fun[0])
    fa, fo = _floats(_avals(args)), _floats(outs)
    lead = tuple(ct.shape[:nb])
    pieces = unpack(ct, outs, select, lead)
    seeds = [_ct_or_zeros(pieces, k, outs[k], lead, ct) for k in fo]
    tangents = [zeros(args[k].shape, args[k].dtype, args[k]) for k in fa]
    transposed = vjp_of(jvp[0], [len(args) + j for j in range(len(fa))], [len(outs) + j for j in range(len(fo))], lead)
    grads = call_graph(transposed, [*args, *tangents, *seeds])
    got = dict(zip(fa, grads, strict=True))
    return [got.get(j) if need[j] else None for j in range(len(args))]


def _flops_custom_jvp(ins: Sequence[AVal], out: AVal, attrs: Mapping[str, Any]) -> float:
    return graph_flops(attrs["fun"][0])


def _scratch_custom_jvp(attrs: Mapping[str, Any]) -> int:
    return graph_bytes_held(attrs["fun"][0])


register(Primitive(
    "custom_jvp", None, {"fun": "graphs", "jvp": "graphs", "select": "ints"},
    _custom_jvp_rule, _custom_jvp_kernel, vjp=_custom_jvp_vjp, jvp=_custom_jvp_jvp, flops=_flops_custom_jvp,
    scratch=_scratch_custom_jvp, shard=shard_refused, shard_sum=sum_refused))
