"""Graph-parallel partitioning of a joint forward+backward graph.

Heavy nodes gather into clusters: a heavy node joins the cluster of its operands (merging them
when it reads several), so each backward node stays with the forward values it reads and
nothing heavy crosses a cut. Cheap nodes that read only inputs and constants are replicated
into every part that needs them (the seeds' broadcasts); cheap nodes that read several
clusters become join nodes run by the caller (the final sum of branch losses). Clusters are
packed into balanced parts (largest first onto the least loaded part), and the parts run in
stages: a stage's parts are independent tasks, then the joins of that stage.
"""

from __future__ import annotations

from dataclasses import dataclass

from gradserve_engine.ir import Builder, Graph, Var

from .cost import node_bytes, node_flops
from .names import residual

REPL, DRIVER = -1, -2


@dataclass(frozen=True)
class Part:
    stage: int
    index: int  # the part (worker) number
    graph: Graph  # inputs and outputs named "%<id>" of the joint graph, or the joint graph's own input names
    flops: float


@dataclass(frozen=True)
class Partition:
    joint: Graph
    parts: tuple[Part, ...]
    driver: tuple[Graph | None, ...]  # per stage: the join nodes the caller runs after that stage's parts
    cut_bytes: int  # bytes that cross between parts and the caller

    @property
    def stages(self) -> int:
        return len(self.driver)


def _find(parent: dict[int, int], x: int) -> int:
    while parent[x] != x:
        parent[x] = parent[parent[x]]
        x = parent[x]
    return x


def partition(joint: Graph, parts: int, heavy_fraction: float = 0.002) -> Partition | None:
    """Cut `joint` into at most `parts` balanced parts; None when it has fewer than two
    independent clusters worth running apart."""
    first = joint.first_node_id
    flops = {n.id: node_flops(joint, n) for n in joint.nodes}
    total = sum(flops.values()) or 1.0
    heavy = {vid for vid, f in flops.items() if f >= heavy_fraction * total}
    owner: dict[int, int] = {}  # node id -> cluster root, REPL or DRIVER
    parent: dict[int, int] = {}
    for n in joint.nodes:
        srcs = {owner[i] for i in n.inputs if i >= first}
        roots = {_find(parent, c) for c in srcs if c >= 0}
        if n.id in heavy or (roots and DRIVER not in srcs and len(roots) == 1):
            parent[n.id] = n.id
            for c in roots:
                parent[_find(parent, c)] = n.id
            owner[n.id] = n.id
        elif not roots and DRIVER not in srcs:
            owner[n.id] = REPL
        else:
            owner[n.id] = DRIVER
    clusters: dict[int, list[int]] = {}
    for vid, o in owner.items():
        if o >= 0:
            clusters.setdefault(_find(parent, o), []).append(vid)
    if len(clusters) < 2:
        return None
    # pack clusters onto parts: largest first onto the least loaded
    load = [0.0] * min(parts, len(clusters))
    part_of: dict[int, int] = {}
    for members in sorted(clusters.values(), key=lambda ms: -sum(flops[m] for m in ms)):
        k = min(range(len(load)), key=load.__getitem__)
        load[k] += sum(flops[m] for m in members)
        for m in members:
            part_of[m] = k
    # stages: a part node comes after the joins it reads; a join after the part nodes it reads
    stage: dict[int, int] = {}
    for n in joint.nodes:
        s = 0
        for i in n.inputs:
            if i >= first and owner[i] != REPL:
                s = max(s, stage[i] + (1 if owner[i] == DRIVER and owner[n.id] >= 0 else 0))
        stage[n.id] = s
    n_stages = max(stage.values()) + 1
    outputs = {vid for _, vid in joint.outputs}
    for vid in outputs:  # replicated values the caller needs: computed by the caller too
        if vid >= first and owner[vid] == REPL:
            owner[vid], stage[vid] = DRIVER, n_stages - 1
    consumers: dict[int, set[tuple[int, int]]] = {}  # value -> {(part or DRIVER, stage)}
    for n in joint.nodes:
        where = (part_of[n.id] if owner[n.id] >= 0 else owner[n.id], stage[n.id])
        for i in n.inputs:
            consumers.setdefault(i, set()).add(where)
    built, cut = [], 0
    for s in range(n_stages):
        for k in range(len(load)):
            members = [n.id for n in joint.nodes if owner[n.id] >= 0 and part_of[n.id] == k and stage[n.id] == s]
            if not members:
                continue
            exports = [m for m in members if m in outputs or any(c != (k, s) for c in consumers.get(m, ()))]
            cut += sum(node_bytes(joint.nodes[m - first]) for m in exports)
            built.append(Part(s, k, subgraph(joint, members, exports, owner), sum(flops[m] for m in members)))
    driver = []
    for s in range(n_stages):
        ids = [n.id for n in joint.nodes if owner[n.id] == DRIVER and stage[n.id] == s]
        driver.append(subgraph(joint, ids, ids, owner) if ids else None)
    return Partition(joint, tuple(built), tuple(driver), cut)


def subgraph(joint: Graph, members: list[int], exports: list[int], owner: dict[int, int]) -> Graph:
    """The graph of `members` (plus the replicated nodes they need), reading every other value
    as an input named after it ("%<id>", or the joint graph's input name), returning `exports`."""
    first = joint.first_node_id
    need = set(members)
    stack = list(members)
    while stack:  # pull in replicated ancestors
        for i in joint.nodes[stack.pop() - first].inputs:
            if i >= first and owner[i] == REPL and i not in need:
                need.add(i)
                stack.append(i)
    b = Builder()
    env: dict[int, Var] = {}
    for vid in sorted(need):
        n = joint.nodes[vid - first]
        for i in n.inputs:
            if i not in env and i not in need:
                if len(joint.inputs) <= i < first:
                    env[i] = b.const(joint.constants[i - len(joint.inputs)])
                else:
                    env[i] = b.input(name_of(joint, i), *joint.aval(i))
        env[vid] = b.bind(n.op, *(env[i] for i in n.inputs), **n.attrs)
    return b.build([(residual(m), env[m]) for m in exports])


def name_of(joint: Graph, vid: int) -> str:
    return joint.inputs[vid].name if vid < len(joint.inputs) else residual(vid)
