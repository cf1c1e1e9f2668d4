"""Differentiation as graph transforms: reverse mode (VJP), forward mode (JVP), and their
compositions (Jacobians with stacked seeds, Hessians, Hessian-vector products).

Each transform takes a Graph and returns a new Graph; the result is an ordinary graph that the
planner caches, the passes optimise, and the transforms can differentiate again.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import GraphError
from .guard import poller
from .ir import Builder, Graph, Var, copy_into, replay
from .names import GRAD, SEED, SEEDS, TANGENT, fresh, jacobian_block, residual
from .ops import PRIMITIVES
from .ops.control import use_transforms
from .ops.core import FLOATS
from .ops.emit import add, zeros


def _check_wrt(graph: Graph, wrt: Sequence[str]) -> list[int]:
    ids = []
    for name in wrt:
        inp = graph.input(name)
        if inp.dtype not in FLOATS:
            raise TypeError(f"cannot differentiate with respect to input {name!r} of dtype {inp.dtype}; "
                            "only float32/float64 inputs have gradients")
        ids.append(inp.id)
    return ids


def active_values(graph: Graph, sources: Sequence[int]) -> set[int]:
    """Float values that depend differentiably on `sources` (forward reachability)."""
    active = set(sources)
    poll = poller("while differentiating")
    for n in graph.nodes:
        poll()
        if PRIMITIVES[n.op].differentiable and n.dtype in FLOATS and any(i in active for i in n.inputs):
            active.add(n.id)
    return active


@dataclass(frozen=True)
class VjpNames:
    """What a VJP graph names its seed input for each differentiated output and its gradient
    output for each input differentiated against."""

    seed: dict[str, str]
    grad: dict[str, str]


def vjp_names(graph: Graph, wrt: Sequence[str], outputs: Sequence[str], keep_outputs: bool = True) -> VjpNames:
    taken_in, taken_out = set(graph.input_names()), set(graph.output_names()) if keep_outputs else set()
    return VjpNames({o: fresh(SEED + o, taken_in) for o in outputs}, {x: fresh(GRAD + x, taken_out) for x in wrt})


def jvp_names(graph: Graph, wrt: Sequence[str]) -> tuple[dict[str, str], dict[str, str]]:
    """What a JVP graph names the tangent input of each x in `wrt` and the tangent output of each output."""
    taken_in, taken_out = set(graph.input_names()), set(graph.output_names())
    return ({x: fresh(TANGENT + x, taken_in) for x in wrt},
            {o: fresh(TANGENT + o, taken_out) for o in graph.output_names()})


def residual_names(graph: Graph) -> dict[int, str]:
    """What a backward graph built with `residuals=True` names the input carrying each forward node's value."""
    taken = set(graph.input_names())
    return {n.id: fresh(residual(n.id), taken) for n in graph.nodes}


def vjp_graph(graph: Graph, wrt: Sequence[str], outputs: Sequence[str] | None = None,
              batch: tuple[int, ...] = (), keep_outputs: bool = True, residuals: bool = False) -> Graph:
    """Reverse mode: a graph of `graph`'s outputs and `grad:<x>` for each x in `wrt`.

    Each differentiated output `o` takes its cotangent from an input of shape `batch + o.shape`
    (stacked seeds when `batch` is not empty; gradients then get the same leading axes); the
    seed inputs and gradient outputs are named as `vjp_names` says. With `residuals=True` the
    forward pass is not recomputed: every forward value the backward pass reads becomes an input
    (named as `residual_names` says, or the input's own name), fed from a forward pass already run.
    """
    wrt_ids = _check_wrt(graph, wrt)
    names = graph.output_names()
    outs = list(names if outputs is None else outputs)
    out_ids = dict(graph.outputs)
    for o in outs:
        if o not in out_ids:
            raise GraphError(f"graph has no output named {o!r}; outputs are {names}")
    named = vjp_names(graph, wrt, outs, keep_outputs)
    kept = residual_names(graph) if residuals else {}
    b = Builder()
    env = copy_into(graph, b)
    poll = poller("while differentiating")
    for n in graph.nodes:  # the forward pass again, or (residuals) its values fed as inputs
        poll()
        env[n.id] = (b.input(kept[n.id], n.dtype, n.shape) if residuals
                     else b.bind(n.op, *(env[i] for i in n.inputs), **n.attrs))

    active = active_values(graph, wrt_ids)
    nb = len(batch)
    cts: dict[int, Var] = {}

    def accumulate(vid: int, ct: Var) -> None:
        cts[vid] = add(cts[vid], ct) if vid in cts else ct  # fan-out: cotangents sum (the chain rule)

    for o in outs:
        vid = out_ids[o]
        dtype, shape = graph.aval(vid)
        if dtype in FLOATS and vid in active:
            accumulate(vid, b.input(named.seed[o], dtype, tuple(batch) + shape))
    for n in reversed(graph.nodes):
        poll()
        ct = cts.pop(n.id, None)  # consumed once: the adjoint is dropped after use
        prim = PRIMITIVES[n.op]
        if ct is None or prim.vjp is None:
            continue
        need = [i in active for i in n.inputs]
        results = prim.vjp(ct, *(env[i] for i in n.inputs), out=env[n.id], need=need, nb=nb, **n.attrs)
        if len(results) != len(n.inputs):
            raise AssertionError(f"VJP rule of {n.op} returned {len(results)} cotangents for {len(n.inputs)} operands")
        for i, r, want in zip(n.inputs, results, need, strict=True):
            if want and r is not None and i in active:
                if r.aval != (graph.aval(i)[0], tuple(batch) + graph.aval(i)[1]):
                    raise AssertionError(f"VJP rule of {n.op} gave {r!r} for operand %{i} at {n.text()}")
                accumulate(i, r)
    result = [(o, env[out_ids[o]]) for o in names] if keep_outputs else []
    for name, vid in zip(wrt, wrt_ids, strict=True):
        dtype, shape = graph.aval(vid)
        g = cts.get(vid)
        if g is None:
            g = zeros(tuple(batch) + shape, dtype, env[vid])
        result.append((named.grad[name], g))
    return b.build(result, prune_inputs=residuals)


def jvp_graph(graph: Graph, wrt: Sequence[str]) -> Graph:
    """Forward mode: a graph of `graph`'s outputs and a tangent output for each float output,
    with a tangent input for each x in `wrt` (named as `jvp_names` says)."""
    wrt_ids = _check_wrt(graph, wrt)
    tan_in, tan_out = jvp_names(graph, wrt)
    b = Builder()
    env = copy_into(graph, b)
    tangents: dict[int, Var] = {vid: b.input(tan_in[x], *graph.aval(vid)) for x, vid in zip(wrt, wrt_ids, strict=True)}
    poll = poller("while differentiating")
    for n in graph.nodes:
        poll()
        args = [env[i] for i in n.inputs]
        out = env[n.id] = b.bind(n.op, *args, **n.attrs)
        ts = [tangents.get(i) for i in n.inputs]
        jvp = PRIMITIVES[n.op].jvp
        if jvp is None or n.dtype not in FLOATS or all(t is None for t in ts):
            continue
        t = jvp(ts, *args, out=out, **n.attrs)
        if t.aval != (n.dtype, n.shape):
            raise AssertionError(f"JVP rule of {n.op} gave {t!r} at {n.text()}")
        tangents[n.id] = t
    result = [(o, env[vid]) for o, vid in graph.outputs]
    for o, vid in graph.outputs:
        dtype, shape = graph.aval(vid)
        if dtype in FLOATS:
            t = tangents.get(vid)
            result.append((tan_out[o], t if t is not None else zeros(shape, dtype, env[vid])))
    return b.build(result)


def jacobian_graph(graph: Graph, wrt: Sequence[str], outputs: Sequence[str]) -> tuple[Graph, list[int]]:
    """Reverse-mode Jacobian of `outputs` w.r.t. `wrt` in one pass over stacked seeds.

    Returns a graph with one input `%seeds` of shape (M, M), M the total output size (the
    caller feeds the identity), and one output of shape o.shape + x.shape for each pair, named
    as `jacobian_outputs` says; and the list of output sizes.
    """
    out_ids = dict(graph.outputs)
    sizes = [math.prod(graph.aval(out_ids[o])[1]) for o in outputs]
    total = sum(sizes)
    dtype = graph.aval(out_ids[outputs[0]])[0]
    inner = vjp_graph(graph, wrt, outputs, batch=(total,), keep_outputs=False)
    named = vjp_names(graph, wrt, outputs, keep_outputs=False)
    offsets = list(itertools.accumulate(sizes, initial=0))  # where each output's seeds begin
    seed_of = {name: k for k, name in enumerate(named.seed[o] for o in outputs)}
    b = Builder()
    env: dict[int, Var] = {}
    seeds = b.input(seeds_name(graph), dtype, (total, total))
    poll = poller("while differentiating")
    for i in inner.inputs:
        poll()
        if i.name in seed_of:
            k = seed_of[i.name]
            start = offsets[k]
            block = b.bind("slice", seeds, starts=(0, start), stops=(total, start + sizes[k]), steps=(1, 1))
            env[i.id] = b.bind("reshape", b.bind("cast", block, dtype=i.dtype) if i.dtype != dtype else block,
                               shape=i.shape)
        else:
            env[i.id] = b.input(i.name, i.dtype, i.shape)
    replay(inner, b, env)
    names = jacobian_outputs(outputs, wrt)
    grads = dict(inner.outputs)
    result = []
    for x in wrt:
        g = env[grads[named.grad[x]]]
        start = 0
        for o, m in zip(outputs, sizes, strict=True):
            poll()
            block = b.bind("slice", g, starts=(start,) + (0,) * (g.ndim - 1), stops=(start + m, *g.shape[1:]),
                           steps=(1,) * g.ndim)
            oshape = graph.aval(out_ids[o])[1]
            result.append((names[(o, x)], b.bind("reshape", block, shape=oshape + g.shape[1:])))
            start += m
    return b.build(result), sizes


def seeds_name(graph: Graph) -> str:
    """The input of `jacobian_graph(graph, ...)` that takes the stacked seeds (the identity)."""
    return fresh(SEEDS, set(graph.input_names()))


def jacobian_outputs(outputs: Sequence[str], wrt: Sequence[str]) -> dict[tuple[str, str], str]:
    """The output of `jacobian_graph` that holds each (output, input) block."""
    return {(o, x): jacobian_block(i * len(outputs) + j) for i, x in enumerate(wrt) for j, o in enumerate(outputs)}


def grad_only(graph: Graph, wrt: Sequence[str], output: str, keep_outputs: bool = False) -> Graph:
    """The gradient of one scalar output as a function of the inputs (seed 1 folded in);
    with `keep_outputs`, the graph's outputs too."""
    _dtype, shape = graph.aval(dict(graph.outputs)[output])
    if shape != ():
        raise GraphError(f"grad needs a scalar output, but {output!r} has shape {shape}; use vjp or jacobian")
    inner = vjp_graph(graph, wrt, [output], keep_outputs=keep_outputs)
    seed = vjp_names(graph, wrt, [output], keep_outputs).seed[output]
    b = Builder()
    env: dict[int, Var] = {}
    for i in inner.inputs:
        env[i.id] = b.const(1.0, i.dtype) if i.name == seed else b.input(i.name, i.dtype, i.shape)
    replay(inner, b, env)
    return b.build([(name, env[vid]) for name, vid in inner.outputs])


use_transforms(vjp_graph=vjp_graph, vjp_names=vjp_names, jvp_graph=jvp_graph)  # the rules of switch, scan, custom_vjp
