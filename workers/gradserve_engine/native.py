"""Native CPU kernels: each fused group compiled with numba into one loop over its elements.

`resolve_kernels(mode)` picks the kernels a Plan runs with:

* ``"numpy"``: the reference numpy kernels, no fusion (the default everywhere);
* ``"native"``: fused groups compiled with numba, whatever their size (numpy when numba is
  not importable: the fallback is reported, never an error);
* ``"auto"``: native when numba is importable, but only for groups of at least
  `AUTO_MIN_ELEMENTS` elements (smaller ones stay numpy kernels) and without the ops whose
  native form is a scalar libm call (their primitive's `libm` trait), where numpy's SIMD loops win.

How a group is compiled. The group's shape is collapsed: dims of size 1 are dropped and
neighbours merged where every input either spans or broadcasts along both, so a bias-add over
(256, 1024) is rows x columns with the bias broadcast along the rows, and a same-shape chain is
one flat run. The kernel loops over *tiles* (a row, or a piece of a long row) of flat arrays
with unsigned indices (numba then emits no negative-index wraparound, and LLVM vectorises the
unit-stride inner loop); an input broadcast along the row is read once per tile. Every
member's value is a local variable of the member's dtype (float32 arithmetic stays float32,
int32 wraps as numpy's), so intermediates never touch memory; only the group's outputs are
stored. A long chain of dependent transcendentals is latency-bound inside one loop body, so
such groups are cut into *stages* (`stages`) run one after the other over blocks of `BLOCK`
elements, values crossing stages passing through small scratch rows that stay in L1.

Epilogues. A group's reductions (`Group.epilogue`: sums, max, min) keep the last axis a collapsed
dim of its own, and the group always runs over blocks: after the block's stages, each reduction
reads the block's values back (from the output block when the value is an output, else from a
scratch row, still in L1). A "row" reduction (over the last axis) keeps partial results that
are combined and stored once per row: a sum adds the values into 8 float64 partial sums,
unrolled so that the adds are independent (without fast-math one running sum is bound by the
latency of each add); a max or min folds them into a row of `LANES` partial results, lane u
taking the values at u modulo LANES (a loop with no running value in a variable, which LLVM
would leave scalar and latency-bound: 3.0 -> 2.0 ms for a 4096 x 1000 float32 bias-add with its
row max, as fast as with its row sum). Tiles are then whole rows, so threads share out rows and
no row is split between them. "col" reductions
(every axis but the last) and "all" ones fold the values into a row of partial column results
per chunk of tiles (each call finds its chunk in `cuts`), which the runner combines after the
kernel (and over the columns, for "all"). Partial sums are float64; a max or min is kept in its
dtype, starts from -inf or +inf and folds with the `maximum` or `minimum` primitive's native
form, which keeps a nan as numpy's np.max does: a nan anywhere in the reduced values gives nan,
and every other result is the same element numpy finds (of two equal zeros, either sign may
come out, as numpy's own SIMD order decides).

The generated source (one function per group signature: ops, dtypes, wiring and which dims
broadcast, not the sizes) is written to ``$GRADSERVE_KERNEL_CACHE`` (default
``~/.cache/gradserve/kernels``; a private temp directory when that is not writable) as
``k_<sha256>.py`` and imported, so numba's ``cache=True`` keeps the machine code on disk across
processes. The digest covers the source and the bytes of `native_math` (below), whose edits
numba's cache would not notice. It is compiled (or loaded) eagerly when the plan is built, for
one explicit signature (further compilation disabled), and `Plan.compile_seconds` reports the time.

Transcendentals. numba without Intel SVML (not installed here) lowers `np.exp` & co. to scalar
libm calls, 3-10x slower than numpy's own SIMD loops, which would lose the fusion gain. The
generated code therefore imports vectorisable implementations of exp, expm1, log, log1p and
tanh (and logistic, built on tanh op by op as the numpy kernel is), and the branch-free select
`_sel`, from the module `gradserve_engine.native_math` (``from gradserve_engine.native_math
import exp as _exp, ...``, only what the kernel calls): Cody-Waite range reduction, polynomials
evaluated with fused multiply-adds, exponent bits through LLVM bitcasts, branch-free selects.
float64 and float32 each have their own (float32 in float32 arithmetic, 16 lanes); both agree
with numpy within 3 ulp of their dtype, including inf, nan, signed zeros, overflow and subnormal
results. That module imports numba; this one does so only when a kernel set needs it. Ops whose
native form is a libm call (sin, cos, tan, atan2, pow) say so in their primitive's `libm` trait.

Threads. Kernels are compiled with ``nogil=True``. A group whose estimated work reaches
`PARALLEL_MIN_WORK` runs its tiles in chunks on the process's thread pool (`threads.py`: the
caller and the pool's workers claim chunks until none are left); smaller groups run in the
calling thread. numba's own ``parallel=True`` was measured and rejected: with its OpenMP layer
(the only thread-safe one installed here) the worker threads spin after each kernel and made
the next OpenBLAS matmul 2.7x slower (2.6 -> 7.2 ms on this 2-core machine), and its workqueue
layer costs 60 us a call and aborts on concurrent calls (the service runs plans on 16 threads).
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import re
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import threads as threads_
from .fusion import Group, KernelSet, epilogue_kind, numpy_group_runner
from .gpu import GpuKernels
from .ir import Node
from .ops import KERNELS, PRIMITIVES
from .ops.core import WORK, Cost, Primitive
from .ops.dtypes import NUMBA_TYPES

MODES = ("numpy", "native", "auto", "gpu")
# groups under this many elements stay numpy kernels in "auto" mode. Measured (python bench/native.py
# --only threshold, 2-core AMD EPYC): a fused bias-add + tanh beats numpy's two kernels from 64 Ki
# elements in float32 and 16 Ki in float64; tanh's VJP g * (1 - y*y) from 16 Ki in both. Below, the
# numba call and argument preparation (~1.5 us more than numpy's per-kernel overhead) cost more
# than the memory passes fusion saves.
AUTO_MIN_ELEMENTS = 32_768
# a group goes to the thread pool when elements x (8 per transcendental, 2 per div/sqrt, 0.5 per
# other op) reaches this: the hand-off costs ~25 us, and memory-bound groups gain nothing from a
# second core (measured: tanh's VJP at 1 Mi elements is slower on 2 threads, bias-add + tanh faster)
PARALLEL_MIN_WORK = 4_000_000



# ---------------------------------------------------------------- numba, imported lazily

_numba_state: tuple[Any, str] | None = None
_numba_lock = threading.Lock()


def numba_status() -> tuple[Any, str]:
    """(the numba module or None, a line saying why not)."""
    global _numba_state
    if _numba_state is None:
        with _numba_lock:
            if _numba_state is None:
                try:
                    import numba
                except Exception as e:  # ImportError, or a broken install (llvmlite mismatch)
                    _numba_state = (None, f"numba is not importable ({type(e).__name__}: {e})")
                else:
                    _numba_state = (numba, f"numba {numba.__version__}")
    return _numba_state


def reset_numba_status() -> None:
    """Forget whether numba imports (tests simulate its absence)."""
    global _numba_state
    _numba_state = None


# ---------------------------------------------------------------- selection


def resolve_kernels(mode: str = "numpy", threads: int | None = None) -> KernelSet:
    """The kernels for `mode` ("numpy", "native", "auto"; see the module docstring; or "gpu",
    `gpu.py`'s CuPy kernels, which raises RuntimeError without CuPy and a device).
    The result's `.name` is what actually runs ("numpy" when numba is missing) and
    `.describe()` says why; both are meant for `cache_info()` and the server's metrics."""
    if mode not in MODES:
        raise ValueError(f"kernels mode {mode!r}: use one of {list(MODES)}")
    if mode == "numpy":
        return KernelSet(KERNELS)
    if mode == "gpu":
        return GpuKernels()
    numba, why = numba_status()
    if numba is None:
        ks = KernelSet(KERNELS)
        ks.reason = f"{mode} requested, running numpy: {why}"
        return ks
    if mode == "native":
        return NativeKernels(min_elements=0, libm_ops=True, threads=threads, requested=mode)
    return NativeKernels(min_elements=AUTO_MIN_ELEMENTS, libm_ops=False, threads=threads, requested=mode)


# ---------------------------------------------------------------- the native kernel set


class NativeKernels(KernelSet):
    """Fused groups compiled with numba; everything else runs the numpy kernels."""

    name = "native"
    in_place = False  # an output over an input defeats LLVM's vectoriser (runtime alias check): 1.8x slower

    def __init__(self, min_elements: int = 0, libm_ops: bool = True, threads: int | None = None,
                 cache_dir: str | os.PathLike | None = None, requested: str = "native"):
        super().__init__(KERNELS, fuse=True)
        self.min_elements = min_elements
        self.libm_ops = libm_ops
        self.threads = threads if threads is not None else threads_.available_cores()
        self.cache_dir = Path(cache_dir) if cache_dir is not None else kernel_cache_dir()
        self.requested = requested
        self.compiled = 0  # groups compiled or loaded by this kernel set
        _, why = numba_status()
        self.reason = f"{requested}: {why}, groups of >= {min_elements} elements" + ("" if libm_ops else
                                                                                      ", libm ops left to numpy")

    def accept(self, node: Node) -> bool:
        # an op whose native form is a scalar libm call (numpy's SIMD loop is faster) is not fused in "auto"
        return self.libm_ops or not PRIMITIVES[node.op].libm

    def compile_group(self, group: Group) -> Callable[..., tuple[Any, ...]] | None:
        if group.size < max(self.min_elements, 1):
            return None if self.min_elements > 0 else numpy_group_runner(group, self.table)
        runner = native_group_runner(group, self.cache_dir, self.threads)
        self.compiled += 1
        return runner

    def describe(self) -> str:
        return self.reason


def kernel_cache_dir() -> Path:
    env = os.environ.get("GRADSERVE_KERNEL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "gradserve" / "kernels"


# ---------------------------------------------------------------- shapes: collapse dims, tiles


def collapse(shape: tuple[int, ...], aligned: Sequence[tuple[int, ...]]) -> tuple[tuple[int, ...], list[tuple[bool, ...]]]:
    """Merged iteration dims and, per input, which of them it spans (True) or broadcasts along.
    Dims of size 1 go; neighbours merge where every input spans both or broadcasts along both."""
    keep = [d for d in range(len(shape)) if shape[d] != 1]
    dims: list[int] = []
    spans: list[list[bool]] = [[] for _ in aligned]
    for d in keep:
        real = [al[d] != 1 for al in aligned]
        if dims and all(s[-1] == r for s, r in zip(spans, real, strict=True)):
            dims[-1] *= shape[d]
        else:
            dims.append(shape[d])
            for s, r in zip(spans, real, strict=True):
                s.append(r)
    if not dims:
        return (1,), [(True,) for _ in aligned]
    return tuple(dims), [tuple(s) for s in spans]


# a max or min epilogue: the elementwise primitive folding a value into a running result (whose
# native form propagates NaN as numpy's np.max does), the result's start, numpy's reduction
# that combines the partial results of the chunks of tiles
EXTREMA = {"reduce_max": ("maximum", -math.inf, np.max), "reduce_min": ("minimum", math.inf, np.min)}


def _fold(op: str, x: str, acc: str, dtype: str) -> str:
    """The expression folding value `x` into the running result `acc` of extremum epilogue `op`."""
    return _expr(PRIMITIVES[EXTREMA[op][0]], [x, acc], dtype, [dtype, dtype])


def _start(op: str, dtype: str) -> str:
    """The start of extremum epilogue `op`'s running result, in the kernel's source."""
    return f"{NUMBA_TYPES[dtype]}({'-' if EXTREMA[op][1] < 0 else ''}np.inf)"


def epilogue_kinds(group: Group) -> list[str]:
    """Each epilogue's `fusion.epilogue_kind`: "row", "col" or "all"."""
    kinds = [epilogue_kind(group.shape, n) for n in group.epilogue]
    if None in kinds:
        raise ValueError(f"an epilogue the native kernels cannot compute: {group.text()}")
    return [k for k in kinds if k is not None]


def collapse_group(group: Group) -> tuple[tuple[int, ...], list[tuple[bool, ...]]]:
    """`collapse` of the group's iteration space. With an epilogue the last axis stays a dim
    of its own: a row of the collapsed space is one "row" reduction, a column one "col" reduction."""
    if not group.epilogue:
        return collapse(group.shape, group.aligned)
    patterns = {(*group.shape[:-1], 1) if k == "row" else (1,) * (len(group.shape) - 1) + group.shape[-1:]
                for k in epilogue_kinds(group)}
    dims, spans = collapse(group.shape, [*group.aligned, *sorted(patterns)])
    return dims, spans[:len(group.aligned)]


# ---------------------------------------------------------------- code generation


def _expr(prim: Primitive, args: list[str], dtype: str, in_dtypes: list[str]) -> str:
    """A value of `prim` as a numba scalar expression over its operands' variables, from the
    primitive's `native` form. Each result has the node's dtype: numba keeps float32 op float32
    in float32, int64 in int64; int32 results (numba computes them in int64) are wrapped back to
    int32, so that they wrap around as numpy's do."""
    if prim.native is None:
        raise NotImplementedError(f"no native form for {prim.name}")
    return prim.native(args, dtype, in_dtypes)


# latency estimates (cycles) for splitting a group into stages; see `stages`
# cycles of latency per element and op cost class (see `stages`), and relative work (`work_per_element`)
_LATENCY = {Cost.CHEAP: 4, Cost.DIV: 15, Cost.TRANSCENDENTAL: 60}
STAGE_LATENCY = 80


def _cost(op: str) -> Cost:
    cost = PRIMITIVES[op].cost
    if cost is None:  # the registry's coverage test gives every elementwise op a cost class
        raise ValueError(f"{op} joined a fused group but has no cost class")
    return cost
BLOCK = 256  # elements per block when a group runs in stages (values between stages stay in L1)
LANES = 16  # partial results of a "row" max or min epilogue (a vector register or two of float32)


def stages(group: Group) -> list[int]:
    """The stage of each member. One element's chain of dependent ops is latency-bound: a
    vectorised loop body holding five chained tanh ran at a third of the speed of five loops
    holding one each (the CPU cannot overlap iterations that long). So members are cut into
    stages whose dependency chains stay short (about one transcendental); a group with more
    than one stage runs stage by stage over blocks of `BLOCK` elements, values crossing stages
    going through small scratch rows."""
    stage_of: list[int] = []
    depth: list[int] = []
    cur = 0
    for j, n in enumerate(group.members):
        cost = _LATENCY[_cost(n.op)]
        d = cost + max([depth[o] for o in group.operands[j] if o >= 0 and stage_of[o] == cur], default=0)
        if d > STAGE_LATENCY and cur in stage_of:
            cur += 1
            d = cost
        stage_of.append(cur)
        depth.append(d)
    return stage_of


def generate(group: Group) -> tuple[str, tuple[int, ...], list[tuple[bool, ...]]]:
    """The kernel's source, the collapsed dims and each input's span pattern.

    The kernel is `kernel(t0, t1, C, B, L, m0, .., m{q-1}, in0, .., out0, ..)`: tiles t0..t1
    of the (rows, L) iteration space, C tiles per row of B columns; m0.. are the outer merged
    dims (rows = their product). Arrays are flat: input k holds (the rows it spans) x (L, or 1
    when it broadcasts along the row), outputs rows x L. Each epilogue e adds `red{e}`: for a
    "row" reduction one value per row, for a "col" or "all" one (chunks of tiles) x L partial
    column results (float64 for sums), a call's chunk found in `cuts` (each chunk's first tile,
    then T), passed last."""
    dims, spans = collapse_group(group)
    q = len(dims) - 1
    n_in, n_out, n_red = len(group.inputs), len(group.outputs), len(group.epilogue)
    kinds = epilogue_kinds(group)
    members = group.members
    params = ["t0", "t1", "C", "B", "L", *(f"m{d}" for d in range(q)), *(f"in{k}" for k in range(n_in)),
              *(f"out{k}" for k in range(n_out)), *(f"red{e}" for e in range(n_red))]
    if any(k != "row" for k in kinds):
        params.append("cuts")
    stage_of = stages(group)
    n_stages = stage_of[-1] + 1
    blocked = n_stages > 1 or n_red > 0  # run over blocks of BLOCK elements (stages, or an epilogue after them)
    out_of = {j: k for k, j in enumerate(group.outputs)}
    # values read in a later stage than their own: outputs are read back from the output block,
    # the others go through scratch rows (one flat scratch array per dtype, rows reused); a value
    # an epilogue reduces is read after the last stage
    last_use = {j: stage_of[j] for j in range(len(members))}
    for k, ops in enumerate(group.operands):
        for o in ops:
            if o >= 0:
                last_use[o] = max(last_use[o], stage_of[k])
    for j in group.reduced:
        last_use[j] = n_stages
    slot: dict[int, str] = {}
    rows: dict[str, int] = {}
    free: dict[str, list[int]] = {}
    for st in range(n_stages):
        for j in range(len(members)):
            if stage_of[j] == st and last_use[j] > st and j not in out_of:
                dt = members[j].dtype
                if free.get(dt):
                    row = free[dt].pop()
                else:
                    row = rows.get(dt, 0)
                    rows[dt] = row + 1
                slot[j] = f"s_{dt}_{row}"
        for j, sl in list(slot.items()):  # rows whose last reader is this stage: free for later stages
            if last_use[j] == st and stage_of[j] < st:
                dt, row = members[j].dtype, int(sl.rsplit("_", 1)[1])
                free.setdefault(dt, []).append(row)
    # arrays are flat; element indices are uint64 so that numba emits no negative-index
    # wraparound, which would stop LLVM from vectorising (and slicing per tile costs compile time)
    body = [f"def kernel({', '.join(params)}):"]
    if "cuts" in params:  # "col" and "all" epilogues: this call's row of partial column results
        body += ["    c = 0",
                 "    while cuts[c + 1] <= t0:",
                 "        c += 1",
                 "    cb = np.uint64(c * L)"]
    for dt, n_rows in rows.items():
        body.append(f"    scr_{dt} = np.empty({n_rows * BLOCK}, {NUMBA_TYPES[dt]})")
    for sl in sorted(set(slot.values())):
        body.append(f"    {sl} = np.uint64({int(sl.rsplit('_', 1)[1]) * BLOCK})")
    for e, n in enumerate(group.epilogue):
        if kinds[e] == "row" and n.op != "reduce_sum":
            body.append(f"    pm{e} = np.empty({LANES}, {NUMBA_TYPES[n.dtype]})")
    body += ["    for t in range(t0, t1):",
             "        r = t // C",
             "        j0 = (t - r * C) * B",
             "        n = np.uint64(min(j0 + B, L) - j0)",
             "        ob = np.uint64(r * L + j0)"]
    if any(0 < sum(s[:q]) < q for s in spans):  # an input spans some outer dims only: the indices of row r
        body.append("        rem = r")
        for d in range(q - 1, 0, -1):
            body.append(f"        i{d} = rem % m{d}")
            body.append(f"        rem = rem // m{d}")
        body.append("        i0 = rem")
    full = []
    for k, s in enumerate(spans):
        outer = [d for d in range(q) if s[d]]
        if q == 0 or not outer:
            index = "0"
        elif len(outer) == q:
            index = "r"
        else:  # row-major over the spanned outer dims
            index = f"i{outer[0]}"
            for d in outer[1:]:
                index = f"({index}) * m{d} + i{d}"
        if s[q]:
            body.append(f"        p{k} = np.uint64(({index}) * L + j0)")
            full.append(k)
        else:
            body.append(f"        x{k} = in{k}[{index}]")
    red_ops = [n.op for n in group.epilogue]
    red_dt = [n.dtype for n in group.epilogue]
    # partial results per "row" epilogue, combined at the row's end: a sum in 8 float64 variables
    # (independent adds), a max or min in a row of LANES of its dtype from -inf or +inf
    for e in range(n_red):
        if kinds[e] == "row" and red_ops[e] == "reduce_sum":
            body.append(f"        {' = '.join(f'a{e}_{u}' for u in range(8))} = np.float64(0.0)")
        elif kinds[e] == "row":
            body.append(f"        for u in range(np.uint64({LANES})):")
            body.append(f"            pm{e}[u] = {_start(red_ops[e], red_dt[e])}")
    if "cuts" in params:
        body.append("        pc = cb + np.uint64(j0)")
    if not blocked:
        ind = "            "
        body.append("        for j in range(n):")
        body.extend(f"{ind}x{k} = in{k}[p{k} + j]" for k in full)
        base = "ob"
    else:
        body.append(f"        for blk in range(np.uint64(0), n, np.uint64({BLOCK})):")
        body.append(f"            m = min(np.uint64({BLOCK}), n - blk)")
        body.extend(f"            q{k} = p{k} + blk" for k in full)
        body.append("            obb = ob + blk")
        ind = "                "
        base = "obb"
    for st in range(n_stages):
        mine = [j for j in range(len(members)) if stage_of[j] == st]
        if blocked:
            body.append("            for j in range(m):")
            used_in = {-1 - o for j in mine for o in group.operands[j] if o < 0}
            body.extend(f"{ind}x{k} = in{k}[q{k} + j]" for k in full if k in used_in)
            earlier = sorted({o for j in mine for o in group.operands[j] if o >= 0 and stage_of[o] < st})
            for o in earlier:
                if o in out_of:
                    body.append(f"{ind}v{o} = out{out_of[o]}[obb + j]")
                else:
                    body.append(f"{ind}v{o} = scr_{members[o].dtype}[{slot[o]} + j]")
        for j in mine:
            args = [f"v{o}" if o >= 0 else f"x{-1 - o}" for o in group.operands[j]]
            in_dt = [members[o].dtype if o >= 0 else group.input_dtypes[-1 - o] for o in group.operands[j]]
            body.append(f"{ind}v{j} = {_expr(PRIMITIVES[members[j].op], args, members[j].dtype, in_dt)}")
        for j in mine:
            if j in out_of:
                body.append(f"{ind}out{out_of[j]}[{base} + j] = v{j}")
            elif j in slot:
                body.append(f"{ind}scr_{members[j].dtype}[{slot[j]} + j] = v{j}")
    if any(k == "row" and op == "reduce_sum" for k, op in zip(kinds, red_ops, strict=True)):
        body.append("            m8 = m - m % np.uint64(8)")
    if any(k == "row" and op != "reduce_sum" for k, op in zip(kinds, red_ops, strict=True)):
        body.append(f"            mv = m - m % np.uint64({LANES})")
    for e, j in enumerate(group.reduced):
        src = f"out{out_of[j]}" if j in out_of else f"scr_{members[j].dtype}"
        at = "obb" if j in out_of else slot[j]
        op, dt = red_ops[e], red_dt[e]
        if kinds[e] != "row":  # column sums (or max, min): this block's values folded into their columns' partials
            body.append("            for i in range(m):")
            if op == "reduce_sum":
                body.append(f"                red{e}[pc + blk + i] += {src}[{at} + i]")
            else:
                body.append(f"                z = {src}[{at} + i]")
                body.append(f"                red{e}[pc + blk + i] = {_fold(op, 'z', f'red{e}[pc + blk + i]', dt)}")
            continue
        if op == "reduce_sum":
            body.append("            for i in range(np.uint64(0), m8, np.uint64(8)):")
            body.append(f"                w = {at} + i")
            body.extend(f"                a{e}_{u} += {src}[w + np.uint64({u})]" for u in range(8))
            body.append("            for i in range(m8, m):")
            body.append(f"                a{e}_0 += {src}[{at} + i]")
            continue
        # a max or min: lane u of the partials takes the values at u modulo LANES, a loop without
        # a reduction in it that LLVM vectorises (a running max in a variable it leaves scalar
        # unless fast-math allows it to drop nan)
        body.append(f"            for i in range(np.uint64(0), mv, np.uint64({LANES})):")
        body.append(f"                w = {at} + i")
        body.append(f"                for u in range(np.uint64({LANES})):")
        body.append(f"                    z = {src}[w + u]")
        body.append(f"                    pm{e}[u] = {_fold(op, 'z', f'pm{e}[u]', dt)}")
        body.append("            for i in range(mv, m):")
        body.append(f"                z = {src}[{at} + i]")
        body.append(f"                pm{e}[0] = {_fold(op, 'z', f'pm{e}[0]', dt)}")
    for e in (e for e in range(n_red) if kinds[e] == "row"):
        if red_ops[e] == "reduce_sum":
            a = [f"a{e}_{u}" for u in range(8)]
            pairs = f"(({a[0]} + {a[1]}) + ({a[2]} + {a[3]})) + (({a[4]} + {a[5]}) + ({a[6]} + {a[7]}))"
            body.append(f"        red{e}[r] = ({pairs})")
            continue
        body.append(f"        acc = pm{e}[0]")
        body.append(f"        for u in range(np.uint64(1), np.uint64({LANES})):")
        body.append(f"            z = pm{e}[u]")
        body.append(f"            acc = {_fold(red_ops[e], 'z', 'acc', red_dt[e])}")
        body.append(f"        red{e}[r] = acc")
    header = [
        "# generated by gradserve_engine.native for the fused group:",
        *("#   " + line for line in group.signature().splitlines()),
        "import numpy as np",
        "from numba import njit",
        *_math_import(body),
        "",
        "",
        '@njit(nogil=True, cache=True, error_model="numpy", fastmath=False, boundscheck=False)',
    ]
    return "\n".join(header + body) + "\n", dims, spans


# a call of `_name(..)` in a generated kernel is `native_math.name` (`_expr` writes `_exp(x)`, `_sel(c, a, b)`)
_MATH_CALL = re.compile(r"(?<![\w.])_([a-z]\w*)\(")


def _math_import(body: list[str]) -> list[str]:
    """The import line of the `native_math` functions the kernel's body calls (none: no line)."""
    names = sorted(set(_MATH_CALL.findall("\n".join(body))))
    if not names:
        return []
    return [f"from gradserve_engine.native_math import {', '.join(f'{n} as _{n}' for n in names)}"]


# ---------------------------------------------------------------- compiling and loading

_kernels: dict[str, Any] = {}
_compile_lock = threading.Lock()


def _numba_array(dtype: str, readonly: bool) -> Any:
    from numba import from_dtype, types

    return types.Array(from_dtype(np.dtype(dtype)), 1, "C", readonly=readonly)


def _write_source(cache_dir: Path, digest: str, source: str) -> Path:
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"k_{digest}.py"
    if not path.exists() or path.read_text() != source:  # written once; atomically, other processes may read it
        tmp = cache_dir / f".k_{digest}.{os.getpid()}.{threading.get_ident()}.tmp"
        tmp.write_text(source)
        os.replace(tmp, path)
    return path


_math_digest: bytes | None = None


def math_digest() -> bytes:
    """sha256 of native_math.py's bytes. Kernels inline its functions, and numba's disk cache
    of a kernel does not notice when they change, so every kernel file's name covers it."""
    global _math_digest
    if _math_digest is None:
        _math_digest = hashlib.sha256(Path(__file__).with_name("native_math.py").read_bytes()).digest()
    return _math_digest


def load_kernel(source: str, signature: tuple, cache_dir: Path) -> Any:
    """The compiled dispatcher for `source` (written to `cache_dir` as ``k_<digest>.py``, the
    digest covering the source and `math_digest`, and imported), compiled (or loaded from
    numba's disk cache) for `signature`, further compilation disabled."""
    digest = hashlib.sha256(math_digest() + source.encode()).hexdigest()[:32]
    with _compile_lock:
        fn = _kernels.get(digest)
        if fn is not None:
            return fn
        try:
            path = _write_source(cache_dir, digest, source)
        except OSError:  # not writable (a read-only home): a private directory, compiled every process
            path = _write_source(Path(tempfile.gettempdir()) / f"gradserve-kernels-{os.getuid()}", digest, source)
        name = f"gradserve_kernel_{digest}"
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load the generated kernel {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        fn = module.kernel
        fn.compile(signature)
        fn.disable_compile()  # mutable arrays convert to the readonly parameters; nothing else may compile
        _kernels[digest] = fn
        return fn


def work_per_element(group: Group) -> float:
    """A rough compute cost per element (see PARALLEL_MIN_WORK)."""
    return sum((WORK[_cost(n.op)] for n in group.members), 0.0) + WORK[Cost.CHEAP] * len(group.epilogue)


def native_group_runner(group: Group, cache_dir: Path, threads: int) -> Callable[..., tuple[Any, ...]]:
    from numba import types

    source, dims, _ = generate(group)
    q = len(dims) - 1
    in_types = [_numba_array(dt, True) for dt in group.input_dtypes]
    kinds = epilogue_kinds(group)
    n_out = len(group.outputs)
    # "col" and "all" epilogues are made as partial column results, one row per chunk of tiles:
    # sums in float64, a max or min in its dtype
    ops = [n.op for n in group.epilogue]
    out_dtypes = [dt for dt, _ in group.result_types[:n_out]] + [
        "float64" if k != "row" and op == "reduce_sum" else n.dtype
        for n, k, op in zip(group.epilogue, kinds, ops, strict=True)]
    out_types = [_numba_array(dt, False) for dt in out_dtypes]
    partial = [n_out + e for e, k in enumerate(kinds) if k != "row"]
    signature = (types.int64,) * (5 + q) + tuple(in_types) + tuple(out_types) + (
        (_numba_array("int64", True),) if partial else ())
    kernel = load_kernel(source, signature, cache_dir)

    rows = math.prod(dims[:q])
    L = dims[q]
    size = group.size
    np_out = [(np.dtype(dt), sh) for dt, sh in group.result_types]
    parallel = threads > 1 and size * work_per_element(group) >= PARALLEL_MIN_WORK
    # tiles: whole rows when there are enough of them, else rows cut into pieces of >= 4096
    want = 4 * threads if parallel else 1
    # a "row" epilogue reduces whole rows: a tile is one row, the rows are shared out among the threads
    C = 1 if rows >= want or "row" in kinds else max(1, min(-(-want // rows), L // 4096))
    B = -(-L // C)
    C = -(-L // B) if L else 1
    T = rows * C
    fixed = (C, B, L, *dims[:q])
    chunks = min(T, 4 * threads)
    cuts = [T * i // chunks for i in range(chunks + 1)] if parallel else [0, T]
    extra = (np.array(cuts, np.int64),) if partial else ()
    n_parts = len(cuts) - 1

    def run(arrays: Sequence[Any], outs: Sequence[Any]) -> tuple[Any, ...]:
        ins = []
        for a in arrays:  # flat views (each input's size is that of its span pattern)
            a = np.asarray(a)
            ins.append(a.reshape(-1) if a.flags.c_contiguous else np.ascontiguousarray(a).reshape(-1))
        res = []
        for k, (buf, (dt, sh)) in enumerate(zip(outs, np_out, strict=True)):
            if k in partial:
                op = ops[k - n_out]
                buf = np.zeros(n_parts * L) if op == "reduce_sum" else np.full(n_parts * L, EXTREMA[op][1], dt)
            elif buf is None or not (buf.flags.c_contiguous and buf.flags.writeable):
                buf = np.empty(sh, dt)
            res.append(buf)
        if size:
            args = (*fixed, *ins, *(b.reshape(-1) for b in res), *extra)
            if parallel:
                threads_.pool().run(kernel, cuts, args)
            else:
                kernel(0, T, *args)
        for k in partial:  # the chunks' partial column results, combined (and over the columns for "all")
            combine = np.sum if ops[k - n_out] == "reduce_sum" else EXTREMA[ops[k - n_out]][2]
            cols = combine(res[k].reshape(n_parts, L), axis=0)
            dt, sh = np_out[k]
            res[k] = np.asarray(combine(cols) if kinds[k - n_out] == "all" else cols, dt).reshape(sh)
        return tuple(res)

    return run
