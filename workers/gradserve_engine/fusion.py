"""Fusion: the planner groups elementwise primitives into one kernel call.

A *group* is a set of elementwise nodes of one result shape (the group's shape) that runs as
one step: each member's value is computed element by element from the group's inputs, and
only the group's *outputs* (members used after the group, or returned by the graph) are
written to memory. Operands that broadcast against the group's shape (a bias row, a (256, 1)
column, a scalar constant) are ordinary group inputs, and chains of broadcasting views that
only the group reads (`broadcast_to`, `expand_dims`, `squeeze`, `reshape` that only adds or
drops 1-dims) are looked through: the group reads their source and the views are never run.

Grouping is a pure planner decision: the graph, its id and the results do not change. Groups
grow from consumers towards producers (so a VJP like `g * (1 - y*y)` fuses with its own
`y*y` and not with the forward pass that made `y`), and a producer joins only if the group
stays *convex*: no path leaves the group and comes back into it, so the group can run as one
step at a point where all its inputs exist. Two convex groups can still need each other (each
reads, through nodes outside both, a value of the other): the smaller is then taken apart.

A float sum, max or min (`EPILOGUE_OPS`) of a member over its last axis (the softmax's row max
and row sums, cross-entropy's per-example losses), over every axis but the last (a bias
gradient's sum over the batch) or over every axis (a loss) can become the group's *epilogue*
when the backend supports it (`KernelSet.epilogues`): the group computes it in the same pass
over the elements, so the member is written to memory only when something else reads it, and
is read back never. The reduction leaves the group as one more output; it reads only a member,
so the group stays convex. One elementwise node with an epilogue is a group too (the logits'
bias-add and their row max: one pass instead of two).

A group *recomputes* a value it reads, instead of reading it from memory, when cheap ops make
it from operands smaller than the group and at most one array of the group's size that is in
memory anyway (`Group.recomputed`): the backward's one-hot of the labels (a column compared with
a row) in the group making the logits' gradient, the logits' bias-add (from the matmul's
result) in the softmax's groups. The value's owner writes it only if some step still reads it
from memory; recomputing from an array of the group's size is done only when that write goes.
Such members are the only ones two groups share. Should a backend decline a group that
recomputes, `schedule` runs the nodes its steps read but no step writes as steps of their own.

Backends (`KernelSet`) decide which groups they compile: the numpy backend interprets a group
member by member with the reference kernels (same bits as unfused; used to test the planner),
the native backend compiles it with numba (`native.py`), the GPU backend with CuPy
(`gpu.py`).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .ir import Graph, Node, type_str
from .ops import KERNELS, OUT_CAPABLE, PRIMITIVES, Kernel
from .ops.core import Cost

Shape = tuple[int, ...]

MAX_VISITS = 20_000  # one cycle check gives up (and refuses the merge) beyond this many nodes visited
MAX_TOTAL_VISITS = 1_000_000  # and all of a graph's checks together (huge graphs: planning stays fast, fusion stops)
MERGE_PASSES = 4  # passes merging producer groups into consumer groups
MAX_RECOMPUTED = 8  # nodes a group may recompute for one value it would otherwise read (see find_groups)


@dataclass(frozen=True)
class Group:
    """One fused step. Members are in graph order; every member has shape `shape`.

    `inputs[k]` is a value id the group reads, laid against the group's shape as `aligned[k]`
    (same rank; each dim is 1 where the input broadcasts, else the group's dim): the group
    reads `value.reshape(aligned[k])`. The same value may appear twice with different
    alignments. `operands[j]` wires member j: an operand `>= 0` is member position, `< 0`
    is input `-1 - operand`. `outputs` are member positions whose values leave the group.
    `absorbed` are view nodes that only the group read; the plan does not run them.
    `epilogue` are reductions computed in the group's pass (float sums, max, min: `epilogue_kind`);
    `reduced[e]` is the member position epilogue node e reads. The group's results are its
    outputs' values, then the epilogue's. `recomputed` are the ids of members the group
    computes for itself though another step owns them (cheap values made from operands smaller
    than the group, see `find_groups`); they are never outputs, and only they may be members
    of two groups.
    """

    shape: Shape
    members: tuple[Node, ...]
    inputs: tuple[int, ...]
    aligned: tuple[Shape, ...]
    input_dtypes: tuple[str, ...]
    operands: tuple[tuple[int, ...], ...]
    outputs: tuple[int, ...]
    absorbed: tuple[int, ...]
    epilogue: tuple[Node, ...] = ()
    reduced: tuple[int, ...] = ()
    recomputed: tuple[int, ...] = ()

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def output_ids(self) -> tuple[int, ...]:
        return tuple(self.members[j].id for j in self.outputs) + tuple(n.id for n in self.epilogue)

    @property
    def result_types(self) -> list[tuple[str, Shape]]:
        """(dtype, shape) of each result, in the order of `output_ids`."""
        return [(self.members[j].dtype, self.shape) for j in self.outputs] + [(n.dtype, n.shape) for n in self.epilogue]

    @property
    def ops(self) -> tuple[str, ...]:
        return tuple(n.op for n in self.members)

    def signature(self) -> str:
        """Canonical text of the computation without the sizes (what compiled code depends on,
        together with which dims broadcast): ops, attributes, dtypes, wiring, outputs."""
        parts = [f"rank {len(self.shape)}"]
        for k, (dt, al) in enumerate(zip(self.input_dtypes, self.aligned, strict=True)):
            pattern = "".join("b" if a == 1 and d != 1 else "r" for a, d in zip(al, self.shape, strict=True))
            parts.append(f"in{k} {dt} {pattern}")
        for j, n in enumerate(self.members):
            attrs = ",".join(f"{k}={v}" for k, v in sorted(n.attrs.items()))
            parts.append(f"m{j} {n.op}[{attrs}] {n.dtype} {self.operands[j]}")
        parts.append(f"out {self.outputs}")
        for n, j in zip(self.epilogue, self.reduced, strict=True):
            parts.append(f"epilogue {n.op}[{','.join(f'{k}={v}' for k, v in sorted(n.attrs.items()))}] {n.dtype} m{j}")
        return "\n".join(parts)

    def text(self) -> str:
        """`%15,%16 = fused[add,tanh] %14 %1 -> %16:f32[256,1024]` (members, ops, inputs, outputs)."""
        ins = " ".join(f"%{v}" for v in dict.fromkeys(self.inputs))
        results = [self.members[j] for j in self.outputs] + list(self.epilogue)
        outs = ",".join(f"%{n.id}:{type_str(n.dtype, n.shape)}" for n in results)
        head = f"{','.join(f'%{n.id}' for n in self.members)} = fused[{','.join(self.ops)}] {ins} -> {outs}"
        if self.epilogue:
            head += f"  (in the same pass: {', '.join(f'%{n.id}={n.op} %{n.inputs[0]}' for n in self.epilogue)})"
        if self.recomputed:
            head += f"  (recomputed: {' '.join(f'%{v}' for v in self.recomputed)})"
        if self.absorbed:
            head += f"  (views read through: {' '.join(f'%{v}' for v in self.absorbed)})"
        return head


# ---------------------------------------------------------------- finding groups


def _nonones(shape: Shape) -> list[int]:
    return [d for d in shape if d != 1]


def _view_source(graph: Graph, vid: int) -> tuple[int, Shape, list[int]] | None:
    """If `vid` is made by a chain of broadcasting views, (source id, the source's shape laid
    against vid's shape, the chain's node ids), else None."""
    first = graph.first_node_id
    chain: list[Node] = []
    cur = vid
    while cur >= first:
        n = graph.nodes[cur - first]
        if not PRIMITIVES[n.op].broadcast_view:  # a view that only broadcasts or moves 1-dims keeps element order
            break
        if n.op == "reshape" and _nonones(graph.aval(n.inputs[0])[1]) != _nonones(n.shape):
            break
        chain.append(n)
        cur = n.inputs[0]
    if not chain:
        return None
    aligned = graph.aval(cur)[1]
    for n in reversed(chain):  # from the source up to vid
        src_shape = graph.aval(n.inputs[0])[1]
        if n.op == "broadcast_to":
            aligned = (1,) * (len(n.shape) - len(aligned)) + aligned
        elif n.op == "expand_dims":
            it = iter(aligned)
            aligned = tuple(1 if i in n.attrs["axes"] else next(it) for i in range(len(n.shape)))
        elif n.op == "squeeze":
            aligned = tuple(a for i, a in enumerate(aligned) if i not in n.attrs["axes"])
        else:  # reshape that keeps the non-1 dims in order
            real = [a for a, d in zip(aligned, src_shape, strict=True) if d != 1]
            it = iter(real)
            aligned = tuple(next(it) if d != 1 else 1 for d in n.shape)
    return cur, aligned, [n.id for n in chain]


def _align(shape: Shape, target: Shape) -> Shape:
    aligned = (1,) * (len(target) - len(shape)) + tuple(shape)
    return tuple(a if a == d else 1 for a, d in zip(aligned, target, strict=True))


# the reductions a group can compute in its own pass (its epilogue)
EPILOGUE_OPS = ("reduce_sum", "reduce_max", "reduce_min")


def epilogue_kind(shape: Shape, node: Node) -> str | None:
    """How a reduction `node` (one of `EPILOGUE_OPS`) of a value of `shape` can run in the pass
    making the value: "row" (over the last axis, the only axis included: the softmax's row max
    and row sums), "col" (over every axis but the last: a bias gradient's sum over the batch),
    "all" (over every axis, rank >= 2), or None."""
    if node.op not in EPILOGUE_OPS or not shape or shape[-1] == 1:
        return None
    axes, rank = tuple(node.attrs["axes"]), len(shape)
    return ("row" if axes == (rank - 1,) else "col" if axes == tuple(range(rank - 1))
            else "all" if axes == tuple(range(rank)) else None)


def epilogue_ok(graph: Graph, node: Node) -> bool:
    """Whether `node` may be computed in the pass of the group making its operand: a float
    sum, max or min of an `epilogue_kind`, the operand's last axis not of size 1."""
    dtype, shape = graph.aval(node.inputs[0])
    return dtype in ("float32", "float64") and node.dtype == dtype and epilogue_kind(shape, node) is not None


def find_groups(graph: Graph, min_members: int = 2, accept: Callable[[Node], bool] | None = None,
                epilogues: bool = False) -> list[Group]:
    """Groups of at least `min_members` nodes (elementwise members and epilogue reductions);
    `accept(node)` may refuse nodes. With `epilogues`, the reductions of members that
    `epilogue_ok` allows join as epilogues.
    Groups are convex and share only recomputed members; the result is in order of each
    group's first member of its own."""
    first = graph.first_node_id
    nodes = graph.nodes
    users: list[list[int]] = [[] for _ in range(graph.n_values)]
    for n in nodes:
        for i in dict.fromkeys(n.inputs):
            users[i].append(n.id)
    returned = {vid for _, vid in graph.outputs}

    def fusible(vid: int, shape: Shape) -> bool:
        if vid < first:
            return False
        n = nodes[vid - first]
        return PRIMITIVES[n.op].elementwise and n.shape == shape and (accept is None or accept(n))

    group_of: dict[int, int] = {}
    spent = [0]  # nodes visited by all cycle checks so far

    def reaches(starts: list[int], members: set[int], limit: int) -> bool:
        """Whether some node in `members` is reachable from `starts` by following users
        (only nodes up to id `limit` can be members); True also when the search is too big."""
        seen: set[int] = set()
        stack = [s for s in starts if s <= limit]
        try:
            while stack:
                v = stack.pop()
                if v in members:
                    return True
                if v in seen:
                    continue
                seen.add(v)
                if len(seen) > MAX_VISITS or spent[0] + len(seen) > MAX_TOTAL_VISITS:
                    return True
                stack.extend(u for u in users[v] if u <= limit)
            return False
        finally:
            spent[0] += len(seen)

    def depends_on(starts: list[int], members: set[int], lower: int) -> bool:
        """Whether some node in `members` is an ancestor of `starts` (following operands,
        only down to id `lower`); True also when the search is too big."""
        seen: set[int] = set()
        stack = [s for s in starts if s >= lower]
        try:
            while stack:
                v = stack.pop()
                if v in members:
                    return True
                if v in seen or v < first:
                    continue
                seen.add(v)
                if len(seen) > MAX_VISITS or spent[0] + len(seen) > MAX_TOTAL_VISITS:
                    return True
                stack.extend(i for i in nodes[v - first].inputs if i >= lower)
            return False
        finally:
            spent[0] += len(seen)

    raw: list[set[int]] = []
    limits: list[int] = []  # the largest member id of each group (members are all ancestors of its seed)

    def grow(gid: int, shape: Shape, start: list[int]) -> list[int]:
        """Add producers of the group's members, largest id first, while the group stays convex
        (no outside user of a producer leads back into the group); returns the ids added."""
        members, limit = raw[gid], limits[gid]
        added: list[int] = []
        heap = [-i for i in dict.fromkeys(start) if i not in group_of and fusible(i, shape)]
        heapq.heapify(heap)
        refused: set[int] = set()
        while True:
            changed = False
            while heap:
                u = -heapq.heappop(heap)
                if u in group_of:
                    continue
                outside = [x for x in users[u] if x not in members]
                if outside and reaches(outside, members, limit):
                    refused.add(u)  # joining would make a cycle (for now: members may still come)
                    continue
                refused.discard(u)
                members.add(u)
                group_of[u] = gid
                added.append(u)
                changed = True
                for i in dict.fromkeys(nodes[u - first].inputs):
                    if i not in group_of and fusible(i, shape):
                        heapq.heappush(heap, -i)
            if not changed or not refused:
                break
            heap = [-u for u in refused if u not in group_of]
            heapq.heapify(heap)
        return added

    for n in reversed(nodes):
        if n.id in group_of or not fusible(n.id, n.shape):
            continue
        # a consumer of an existing group joins it when that keeps the group convex: its other
        # operands must not depend on the group, and its users must not lead back into it
        joined = -1
        candidates = {group_of[i] for i in n.inputs if i in group_of and nodes[i - first].shape == n.shape}
        for gid in sorted(candidates, key=lambda g: -len(raw[g])):
            members = raw[gid]
            if reaches(users[n.id], members, limits[gid]):
                continue
            members.add(n.id)
            group_of[n.id] = gid
            new = [n.id, *grow(gid, n.shape, list(n.inputs))]
            external = [i for v in new for i in nodes[v - first].inputs if i not in members]
            if depends_on(external, members, min(members)):
                for v in new:  # not convex after all: undo
                    members.discard(v)
                    del group_of[v]
                continue
            joined = gid
            break
        if joined < 0:
            raw.append({n.id})
            limits.append(n.id)
            group_of[n.id] = len(raw) - 1
            grow(len(raw) - 1, n.shape, list(n.inputs))

    # merge a group into the group that consumes its values when the union stays convex (this
    # catches what growing one group at a time misses, e.g. a forward tail that only the loss reads)
    refused_pairs: set[tuple[int, int]] = set()
    for _ in range(MERGE_PASSES):
        changed = False
        for gid in range(len(raw)):
            members = raw[gid]
            if not members or spent[0] > MAX_TOTAL_VISITS:
                continue
            producers = {group_of[i] for v in members for i in nodes[v - first].inputs
                         if i in group_of and group_of[i] != gid and nodes[i - first].shape == nodes[v - first].shape}
            for pid in sorted(producers, key=lambda g: -len(raw[g])):
                if (gid, pid) in refused_pairs or not raw[pid]:
                    continue
                union = members | raw[pid]
                external = [i for v in union for i in nodes[v - first].inputs if i not in union]
                if depends_on(external, union, min(union)):
                    refused_pairs.add((gid, pid))
                    continue
                for v in raw[pid]:
                    group_of[v] = gid
                members |= raw[pid]
                raw[pid] = set()
                limits[gid] = max(limits[gid], limits[pid])
                changed = True
        if not changed:
            break

    # Each group is convex, but two groups can still need each other: one reads, through a node
    # outside both, what the other makes, and the other way round. As single steps neither could
    # run first; the smallest group of each such cycle is taken apart until there is none.
    while True:
        cycles = _cycles(graph, raw, group_of)
        if not cycles:
            break
        for cycle in cycles:
            gid = min(cycle, key=lambda g: (len(raw[g]), g))
            for v in raw[gid]:
                group_of[v] = len(raw)
                raw.append({v})
            raw[gid] = set()

    tails: dict[int, list[int]] = {}
    for gid, ids in enumerate(raw):
        tail = sorted(u for v in ids for u in users[v] if epilogue_ok(graph, nodes[u - first])) if epilogues else []
        if ids and len(ids) + len(tail) >= min_members:  # one elementwise node and its reduction: one pass, not two
            tails[gid] = tail

    def small(vid: int, size: int) -> bool:
        """Whether `vid`, read through broadcasting views, has fewer elements than a group of `size`."""
        src = _view_source(graph, vid)
        return math.prod(graph.aval(src[0] if src is not None else vid)[1]) < size

    def cheap_cone(vid: int, shape: Shape) -> tuple[set[int], set[int]] | None:
        """(the nodes, the arrays of the group's size they read): how cheap elementwise ops (at
        most MAX_RECOMPUTED) make `vid` from smaller operands and from arrays written anyway
        (no group's members), or None."""
        size = math.prod(shape)
        cone: set[int] = set()
        leaves: set[int] = set()
        stack = [vid]
        while stack:
            c = stack.pop()
            if c in cone or c in leaves:
                continue
            if fusible(c, shape) and PRIMITIVES[nodes[c - first].op].cost == Cost.CHEAP:
                if len(cone) == MAX_RECOMPUTED:
                    return None
                cone.add(c)
                stack.extend(i for i in nodes[c - first].inputs if not small(i, size))
            elif c != vid and group_of.get(c, -1) not in tails:
                leaves.add(c)
            else:
                return None
        return cone, leaves

    # A group recomputes a value it reads when cheap elementwise ops make it from operands smaller
    # than the group (a one-hot of the labels: a column and a row) and at most one array of the
    # group's size that is in memory anyway (the logits' bias-add: the matmul's result): from
    # smaller operands only, the group reads less; from one array, the group reads that array
    # instead, so this is done only when no step is left that reads the value (its owner need not
    # write it). Groups stay convex: the cone's operands are ancestors of a value the group read,
    # so they cannot depend on the group.
    # A value is recomputed only in groups of its own shape (a group may read a smaller value
    # through broadcasting: that one stays an input), so its cone is worked out at that shape.
    cones: dict[int, tuple[set[int], set[int]] | None] = {}
    for gid in tails:
        for i in sorted({i for v in raw[gid] for i in nodes[v - first].inputs} - raw[gid]):
            if i not in cones:
                own = graph.aval(i)[1]
                cones[i] = cheap_cone(i, own) if fusible(i, own) else None

    def recomputed_by_all(vid: int) -> bool:
        """Whether every step reading `vid` is in its owner group or a group of its shape."""
        owner = group_of.get(vid, -1)
        shape = nodes[vid - first].shape
        return vid not in returned and all(
            (owner in tails and (u in raw[owner] or u in tails[owner]))
            or (group_of.get(u, -1) in tails and nodes[u - first].shape == shape) for u in users[vid])

    worth = {i for i, c in cones.items() if c is not None and (not c[1] or (len(c[1]) == 1 and recomputed_by_all(i)))}
    recomputed: dict[int, set[int]] = {}
    for gid in tails:
        recomputed[gid] = set()
        shape = nodes[min(raw[gid]) - first].shape
        for i in {i for v in raw[gid] for i in nodes[v - first].inputs} & worth - raw[gid]:
            cone = cones[i]
            assert cone is not None
            if nodes[i - first].shape == shape:
                recomputed[gid] |= cone[0]

    def read_by(u: int, v: int) -> bool:
        """Whether node `u`, outside the group owning `v`, reads `v` from memory."""
        gid = group_of.get(u, -1)
        return not (gid in recomputed and v in recomputed[gid])

    groups = [_make_group(graph, sorted(raw[gid]), users, returned, tail, sorted(recomputed[gid]), read_by)
              for gid, tail in tails.items()]
    groups.sort(key=lambda g: min(n.id for n in g.members if n.id not in g.recomputed))
    return groups


def _cycles(graph: Graph, raw: list[set[int]], group_of: dict[int, int]) -> list[list[int]]:
    """The groups (of two or more members) on each cycle of the graph of steps, where each such
    group is one step: the strongly connected components with more than one step (Tarjan's
    algorithm, iterative)."""
    first = graph.first_node_id
    n_groups = len(raw)

    def unit(v: int) -> int:
        gid = group_of.get(v, -1)
        return gid if gid >= 0 and len(raw[gid]) > 1 else n_groups + v - first

    succ: list[set[int]] = [set() for _ in range(n_groups + len(graph.nodes))]
    for n in graph.nodes:
        u = unit(n.id)
        for i in n.inputs:
            if i >= first and unit(i) != u:
                succ[unit(i)].add(u)
    index: dict[int, int] = {}
    low: dict[int, int] = {}
    stack: list[int] = []
    on_stack: set[int] = set()
    found: list[list[int]] = []
    for root in [g for g in range(n_groups) if len(raw[g]) > 1]:
        if root in index:
            continue
        work = [(root, iter(sorted(succ[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            u, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(succ[w]))))
                elif w in on_stack:
                    low[u] = min(low[u], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[u])
            if low[u] == index[u]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == u:
                        break
                if len(component) > 1:
                    found.append(sorted(g for g in component if g < n_groups))
    return found


def _make_group(graph: Graph, ids: list[int], users: list[list[int]], returned: set[int],
                epilogue: Sequence[int] = (), recomputed: Sequence[int] = (),
                read_by: Callable[[int, int], bool] = lambda u, v: True) -> Group:
    """The group of nodes `ids` and the `recomputed` ones (see `Group`); `read_by(u, v)`: whether
    user `u` outside the group reads member `v` from memory (False: `u`'s group recomputes it)."""
    first = graph.first_node_id
    own = set(ids)
    ids = sorted(own | set(recomputed))
    members = [graph.nodes[i - first] for i in ids]
    shape = graph.nodes[min(own) - first].shape  # an owned member's: recomputed ones have the same
    pos = {n.id: j for j, n in enumerate(members)}
    inputs: list[int] = []
    aligned: list[Shape] = []
    index: dict[tuple[int, Shape], int] = {}
    chains: dict[int, list[int]] = {}
    operands = []
    for n in members:
        ops = []
        for i in n.inputs:
            if i in pos:
                ops.append(pos[i])
                continue
            src = _view_source(graph, i)
            if src is not None:
                vid, al, chain = src
                al = _align(al, shape)
                chains[i] = chain
            else:
                vid, al = i, _align(graph.aval(i)[1], shape)
            assert math.prod(al) == math.prod(graph.aval(vid)[1]), (vid, al)
            key = (vid, al)
            if key not in index:
                index[key] = len(inputs)
                inputs.append(vid)
                aligned.append(al)
            ops.append(-1 - index[key])
        operands.append(tuple(ops))
    # views that only this group reads (directly or through other such views) are not run
    inside = set(ids) | set(epilogue)
    absorbed: list[int] = []
    changed = True
    candidates = {v for chain in chains.values() for v in chain}
    while changed:
        changed = False
        for v in sorted(candidates - set(absorbed), reverse=True):
            if v not in returned and users[v] and all(u in inside for u in users[v]):
                absorbed.append(v)
                inside.add(v)
                changed = True
    outputs = tuple(j for j, n in enumerate(members) if n.id in own and (
        n.id in returned or any(u not in inside and read_by(u, n.id) for u in users[n.id])))
    tail = tuple(graph.nodes[i - first] for i in epilogue)
    return Group(shape, tuple(members), tuple(inputs), tuple(aligned), tuple(graph.aval(v)[0] for v in inputs),
                 tuple(operands), outputs, tuple(sorted(absorbed)), tail, tuple(pos[n.inputs[0]] for n in tail),
                 tuple(sorted(recomputed)))


def schedule(graph: Graph, groups: Sequence[Group]) -> list[Node | Group]:
    """The steps in a valid order: each group (those the backend compiled) runs as one step,
    absorbed views not at all, nodes only groups recompute only where a step reads them (the
    group owning such a value did not write it because a group recomputes it, and the backend
    declined that group: the node runs as a step of its own). Kahn's algorithm, preferring the
    earliest original position (a group's first member of its own)."""
    first = graph.first_node_id
    producer: dict[int, int] = {}  # value id -> the unit writing it
    units: list[Node | Group] = []
    keys: list[int] = []
    inside: set[int] = set()  # members and epilogues owned by a group
    for g in groups:
        mine = [n.id for n in g.members if n.id not in g.recomputed]
        inside.update(mine, (n.id for n in g.epilogue))
        for v in g.output_ids:
            producer[v] = len(units)
        units.append(g)
        keys.append(min(mine))
    skipped = {v for g in groups for v in g.absorbed} | {v for g in groups for v in g.recomputed}
    for n in graph.nodes:
        if n.id not in inside and n.id not in skipped:
            producer[n.id] = len(units)
            units.append(n)
            keys.append(n.id)
    wanted = [i for u in units for i in u.inputs] + [vid for _, vid in graph.outputs]
    while wanted:  # a value some step reads that no step writes: its node runs as a step of its own
        v = wanted.pop()
        if v >= first and v not in producer:
            n = graph.nodes[v - first]
            producer[v] = len(units)
            units.append(n)
            keys.append(n.id)
            wanted.extend(n.inputs)

    deps: list[set[int]] = []
    for k, u in enumerate(units):
        deps.append({producer[i] for i in u.inputs if i >= first} - {k})
    waiting = [len(d) for d in deps]
    dependents: list[list[int]] = [[] for _ in units]
    for k, d in enumerate(deps):
        for j in d:
            dependents[j].append(k)
    ready = [(keys[k], k) for k in range(len(units)) if waiting[k] == 0]
    heapq.heapify(ready)
    order: list[Node | Group] = []
    while ready:
        _, k = heapq.heappop(ready)
        order.append(units[k])
        for j in dependents[k]:
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(ready, (keys[j], j))
    if len(order) != len(units):
        raise AssertionError("fusion made a cycle (a group is not convex): this is a planner bug")
    return order


# ---------------------------------------------------------------- backends


class KernelSet:
    """What a Plan runs with: the per-op kernel table, and (when `fuse`) which fused groups
    become single steps. `compile_group` returns a runner `fn(arrays, outs) -> tuple of
    outputs` (arrays: the group's inputs in order; outs: a preallocated buffer or None per
    output) or None to leave the group's members as separate steps."""

    name = "numpy"
    in_place = False  # whether a runner may write an output over an input that dies at the step
    epilogues = True  # whether runners compute a group's epilogue (sums, max, min in the same pass)

    def __init__(self, table: Mapping[str, Kernel] = KERNELS, fuse: bool = False):
        self.table = table
        self.fuse = fuse
        self.reason = ""  # why these kernels (e.g. "native requested, running numpy: numba is not importable")

    def accept(self, node: Node) -> bool:
        """Whether `node` may join a group (a hook for backends that cannot fuse some ops)."""
        return True

    def compile_group(self, group: Group) -> Callable[..., tuple[Any, ...]] | None:
        return numpy_group_runner(group, self.table)

    def upload(self, a: Any) -> Any:
        """Constants and inputs as the kernels need them (the GPU backend moves them)."""
        return a

    def result(self, a: Any, mode: int) -> Any:
        """A plan's result as the caller gets it. `mode`: 0 a value of the plan's own, 1 a value
        that may alias an input or constant (copied), 2 a 0-d value (a numpy scalar)."""
        return a if mode == 0 else np.array(a) if mode == 1 else a[()]

    def describe(self) -> str:
        """One line for cache_info and metrics: what runs, and why."""
        return self.reason or self.name + (" (fusion on)" if self.fuse else "")


def numpy_group_runner(group: Group, table: Mapping[str, Kernel]) -> Callable[..., tuple[Any, ...]]:
    """Run a group member by member with `table`'s kernels: the same bits as the unfused plan.
    Intermediates are dropped after their last use in the group and written over in place.
    A member whose operands all broadcast is computed at their (smaller) broadcast shape, as
    numpy would compute it from the views; an output of that kind is materialised at the end."""
    members = group.members
    m = len(members)
    last = [-1] * m
    for j, ops in enumerate(group.operands):
        for o in ops:
            if o >= 0:
                last[o] = j
    for j in group.reduced:  # read by the epilogue, after every member
        last[j] = m
    is_out = [False] * m
    for j in group.outputs:
        is_out[j] = True
    out_slot = {j: k for k, j in enumerate(group.outputs)}
    last_input = [-1] * len(group.inputs)
    for j, ops in enumerate(group.operands):
        for o in ops:
            if o < 0:
                last_input[-1 - o] = j
    shape = group.shape
    shapes: list[Shape] = []
    steps = []
    for j, n in enumerate(members):
        ops = group.operands[j]
        shapes.append(tuple(np.broadcast_shapes(*(shapes[o] if o >= 0 else group.aligned[-1 - o] for o in ops))))
        can_out = n.op in OUT_CAPABLE and bool(n.shape)
        dying = [o for o in dict.fromkeys(ops) if o >= 0 and last[o] == j and not is_out[o]]
        reuse = next((o for o in dying if members[o].dtype == n.dtype and shapes[o] == shapes[j]), -1) if can_out else -1
        later = tuple(k for k, lj in enumerate(last_input) if lj > j)
        slot = out_slot.get(j, -1) if shapes[j] == shape else -1
        steps.append((table[n.op], ops, dict(n.attrs), can_out, reuse, tuple(dying), later, slot))
    aligned = group.aligned
    outputs = [(j, shapes[j] != shape) for j in group.outputs]
    tail = [(table[n.op], j, dict(n.attrs), shapes[j] != shape) for n, j in zip(group.epilogue, group.reduced, strict=True)]

    def run(arrays: Sequence[Any], outs: Sequence[Any]) -> tuple[Any, ...]:
        ins = [np.reshape(a, al) for a, al in zip(arrays, aligned, strict=True)]
        env: list[Any] = [None] * m
        for j, (kernel, ops, attrs, can_out, reuse, dying, later, slot) in enumerate(steps):
            args = [env[o] if o >= 0 else ins[-1 - o] for o in ops]
            buf = outs[slot] if slot >= 0 else None
            if buf is not None and any(buf is arrays[k] for k in later):
                buf = None  # still to be read by a later member: do not write over it yet
            if buf is None and reuse >= 0:
                buf = env[reuse]
            env[j] = kernel(*args, out=buf, **attrs) if can_out and buf is not None else kernel(*args, **attrs)
            for o in dying:
                if o != j:
                    env[o] = None
        res = [np.broadcast_to(env[j], shape).copy() if small else env[j] for j, small in outputs]
        res += [kernel(np.broadcast_to(env[j], shape) if small else env[j], **attrs) for kernel, j, attrs, small in tail]
        return tuple(res)

    return run
