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

The generated source (one function per group signature: ops, dtypes, wiring and which dims
broadcast, not the sizes) is written to ``$GRADSERVE_KERNEL_CACHE`` (default
``~/.cache/gradserve/kernels``; a private temp directory when that is not writable) as
``k_<sha256>.py`` and imported, so numba's ``cache=True`` keeps the machine code on disk across
processes. It is compiled (or loaded) eagerly when the plan is built, for one explicit
signature (further compilation disabled), and `Plan.compile_seconds` reports the time.

Transcendentals. numba without Intel SVML (not installed here) lowers `np.exp` & co. to scalar
libm calls, 3-10x slower than numpy's own SIMD loops, which would lose the fusion gain. The
generated code therefore uses the vectorisable implementations in `MATH_SOURCE` for exp, expm1,
log, log1p and tanh (and logistic, built on tanh op by op as the numpy kernel is): Cody-Waite
range reduction, polynomials evaluated with fused multiply-adds, exponent bits through LLVM
bitcasts, branch-free selects. float64 and float32 each have their own (float32 in float32
arithmetic, 16 lanes); both agree with numpy within 3 ulp of their dtype, including inf, nan,
signed zeros, overflow and subnormal results. sin, cos, tan, arctan, atan2 and pow use libm (the `libm` trait).

Threads. Kernels are compiled with ``nogil=True``. A group whose estimated work reaches
`PARALLEL_MIN_WORK` runs on this module's small thread pool: the caller and ``threads - 1``
workers claim chunks of tiles until none are left, and the caller never waits for a worker
that has not started (on a loaded machine it does the work alone); smaller groups run in the
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
import sys
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .fusion import Group, KernelSet, numpy_group_runner
from .gpu import GpuKernels
from .ir import Node
from .ops import KERNELS, PRIMITIVES
from .ops.core import NUMBA_TYPES, Cost

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
    `workers/gpu.py`'s CuPy kernels, which raises RuntimeError without CuPy and a device).
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
        self.threads = threads if threads is not None else max(1, min(os.cpu_count() or 1, 8))
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


# ---------------------------------------------------------------- code generation


def _expr(n: Node, args: list[str], in_dtypes: list[str]) -> str:
    """One member's value as a numba scalar expression over its operands' variables, from its
    primitive's `native` form. Each result has the member's dtype: numba keeps float32 op float32
    in float32, int64 in int64; int32 results (numba computes them in int64) are wrapped back to
    int32, so that they wrap around as numpy's do."""
    native = PRIMITIVES[n.op].native
    if native is None:
        raise NotImplementedError(f"no native form for {n.op}")
    return native(args, n.dtype, in_dtypes)


# latency estimates (cycles) for splitting a group into stages; see `stages`
# cycles of latency per element and op cost class (see `stages`), and relative work (`work_per_element`)
_LATENCY = {Cost.CHEAP: 4, Cost.DIV: 15, Cost.TRANSCENDENTAL: 60}
_WORK = {Cost.CHEAP: 0.5, Cost.DIV: 2.0, Cost.TRANSCENDENTAL: 8.0}
STAGE_LATENCY = 80
BLOCK = 256  # elements per block when a group runs in stages (values between stages stay in L1)


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
        cost = _LATENCY[PRIMITIVES[n.op].cost]
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
    when it broadcasts along the row), outputs rows x L."""
    dims, spans = collapse(group.shape, group.aligned)
    q = len(dims) - 1
    n_in, n_out = len(group.inputs), len(group.outputs)
    members = group.members
    params = ["t0", "t1", "C", "B", "L", *(f"m{d}" for d in range(q)), *(f"in{k}" for k in range(n_in)),
              *(f"out{k}" for k in range(n_out))]
    stage_of = stages(group)
    n_stages = stage_of[-1] + 1
    out_of = {j: k for k, j in enumerate(group.outputs)}
    # values read in a later stage than their own: outputs are read back from the output block,
    # the others go through scratch rows (one flat scratch array per dtype, rows reused)
    last_use = {j: stage_of[j] for j in range(len(members))}
    for k, ops in enumerate(group.operands):
        for o in ops:
            if o >= 0:
                last_use[o] = max(last_use[o], stage_of[k])
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
    for dt, n_rows in rows.items():
        body.append(f"    scr_{dt} = np.empty({n_rows * BLOCK}, {NUMBA_TYPES[dt]})")
    for sl in sorted(set(slot.values())):
        body.append(f"    {sl} = np.uint64({int(sl.rsplit('_', 1)[1]) * BLOCK})")
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
            row = "0"
        elif len(outer) == q:
            row = "r"
        else:  # row-major over the spanned outer dims
            row = f"i{outer[0]}"
            for d in outer[1:]:
                row = f"({row}) * m{d} + i{d}"
        if s[q]:
            body.append(f"        p{k} = np.uint64(({row}) * L + j0)")
            full.append(k)
        else:
            body.append(f"        x{k} = in{k}[{row}]")
    if n_stages == 1:
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
        if n_stages > 1:
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
            body.append(f"{ind}v{j} = {_expr(members[j], args, in_dt)}")
        for j in mine:
            if j in out_of:
                body.append(f"{ind}out{out_of[j]}[{base} + j] = v{j}")
            elif j in slot:
                body.append(f"{ind}scr_{members[j].dtype}[{slot[j]} + j] = v{j}")
    header = [
        "# generated by gradserve_engine.native for the fused group:",
        *("#   " + line for line in group.signature().splitlines()),
        "import numpy as np",
        "from numba import njit, types",
        "from numba.extending import intrinsic",
        "",
        MATH_SOURCE,
        "",
        '@njit(nogil=True, cache=True, error_model="numpy", fastmath=False, boundscheck=False)',
    ]
    return "\n".join(header + body) + "\n", dims, spans


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


def load_kernel(source: str, signature: tuple, cache_dir: Path) -> Any:
    """The compiled dispatcher for `source` (written to `cache_dir` and imported), compiled
    (or loaded from numba's disk cache) for `signature`, further compilation disabled."""
    digest = hashlib.sha256(source.encode()).hexdigest()[:32]
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
    return sum(_WORK[PRIMITIVES[n.op].cost] for n in group.members)


def native_group_runner(group: Group, cache_dir: Path, threads: int) -> Callable[..., tuple[Any, ...]]:
    from numba import types

    source, dims, _ = generate(group)
    q = len(dims) - 1
    n_in = len(group.inputs)
    in_types = [_numba_array(dt, True) for dt in group.input_dtypes]
    out_dtypes = [group.members[j].dtype for j in group.outputs]
    out_types = [_numba_array(dt, False) for dt in out_dtypes]
    signature = (types.int64,) * (5 + q) + tuple(in_types) + tuple(out_types)
    kernel = load_kernel(source, signature, cache_dir)

    rows = math.prod(dims[:q])
    L = dims[q]
    size = group.size
    shape = group.shape
    np_out = [np.dtype(dt) for dt in out_dtypes]
    parallel = threads > 1 and size * work_per_element(group) >= PARALLEL_MIN_WORK
    # tiles: whole rows when there are enough of them, else rows cut into pieces of >= 4096
    want = 4 * threads if parallel else 1
    C = 1 if rows >= want else max(1, min(-(-want // rows), L // 4096))
    B = -(-L // C)
    C = -(-L // B) if L else 1
    T = rows * C
    fixed = (C, B, L, *dims[:q])
    chunks = min(T, 4 * threads)
    cuts = [T * i // chunks for i in range(chunks + 1)] if parallel else [0, T]
    assert len(group.inputs) == n_in

    def run(arrays: Sequence[Any], outs: Sequence[Any]) -> tuple[Any, ...]:
        ins = []
        for a in arrays:  # flat views (each input's size is that of its span pattern)
            a = np.asarray(a)
            ins.append(a.reshape(-1) if a.flags.c_contiguous else np.ascontiguousarray(a).reshape(-1))
        res = []
        for buf, dt in zip(outs, np_out, strict=True):
            if buf is None or not (buf.flags.c_contiguous and buf.flags.writeable):
                buf = np.empty(shape, dt)
            res.append(buf)
        if size:
            args = (*fixed, *ins, *(b.reshape(-1) for b in res))
            if parallel:
                _pool(threads).run(kernel, cuts, args)
            else:
                kernel(0, T, *args)
        return tuple(res)

    return run


# ---------------------------------------------------------------- the thread pool


class _Job:
    """One kernel call split into chunks of tiles, claimed one at a time by whoever is free."""

    def __init__(self, fn: Any, bounds: list[int], args: tuple):
        self.fn, self.bounds, self.args = fn, bounds, args
        self.lock = threading.Lock()
        self.next = 0
        self.running = 0
        self.finished = threading.Event()
        self.error: BaseException | None = None

    def help(self) -> None:
        last = len(self.bounds) - 1
        while True:
            with self.lock:
                i = self.next
                if i >= last:
                    return
                self.next = i + 1
                self.running += 1
            try:
                self.fn(self.bounds[i], self.bounds[i + 1], *self.args)
            except BaseException as e:  # reported to the caller
                self.error = e
            finally:
                with self.lock:
                    self.running -= 1
                    if self.running == 0 and self.next >= last:
                        self.finished.set()

    def wait(self) -> None:
        with self.lock:
            idle = self.running == 0
        if not idle:
            self.finished.wait()
        if self.error is not None:
            raise self.error


class _Pool:
    """The caller and `n - 1` daemon workers run a kernel's chunks of tiles, each claiming the
    next chunk when free (nogil kernels: they run in parallel). The caller waits only for chunks
    a worker has claimed, never for a worker that has not woken up yet (on a busy machine a
    worker can be off the CPU for a whole time slice; the caller then does the work alone).
    One call at a time: a caller that finds the pool busy (another thread's plan) runs its
    tiles itself."""

    def __init__(self, n: int):
        self.n = n
        self.pid = os.getpid()
        self.busy = threading.Lock()
        self.wake = threading.Semaphore(0)
        self.job: _Job | None = None
        for i in range(1, n):
            threading.Thread(target=self._work, name=f"gradserve-native-{i}", daemon=True).start()

    def _work(self) -> None:
        while True:
            self.wake.acquire()
            job = self.job
            if job is not None:
                job.help()

    def run(self, fn: Any, bounds: list[int], args: tuple) -> None:
        if not self.busy.acquire(blocking=False):
            fn(bounds[0], bounds[-1], *args)
            return
        try:
            job = self.job = _Job(fn, bounds, args)
            for _ in range(self.n - 1):
                self.wake.release()
            job.help()
            job.wait()
        finally:
            self.job = None
            self.busy.release()


_pools: dict[int, _Pool] = {}
_pool_lock = threading.Lock()


def _pool(n: int) -> _Pool:
    p = _pools.get(n)
    if p is None or p.pid != os.getpid():  # threads do not survive fork
        with _pool_lock:
            p = _pools.get(n)
            if p is None or p.pid != os.getpid():
                p = _pools[n] = _Pool(n)
    return p


# ---------------------------------------------------------------- vectorisable math (float64)

MATH_SOURCE = '''
@intrinsic
def _pow2(typingctx, kf):
    # 2**kf for an integral float kf in the normal exponent range, built from exponent bits
    def codegen(context, builder, signature, args):
        f32 = signature.return_type == types.float32
        ity = context.get_value_type(types.int32 if f32 else types.int64)
        i = builder.fptosi(args[0], ity)
        i = builder.add(i, ity(127 if f32 else 1023))
        i = builder.shl(i, ity(23 if f32 else 52))
        return builder.bitcast(i, context.get_value_type(signature.return_type))
    return kf(kf), codegen


@intrinsic
def _exponent(typingctx, x):
    # the unbiased exponent field of a normal x, as a float
    def codegen(context, builder, signature, args):
        f32 = signature.return_type == types.float32
        ity = context.get_value_type(types.int32 if f32 else types.int64)
        i = builder.bitcast(args[0], ity)
        i = builder.lshr(i, ity(23 if f32 else 52))
        i = builder.and_(i, ity(0xFF if f32 else 0x7FF))
        i = builder.sub(i, ity(127 if f32 else 1023))
        return builder.sitofp(i, context.get_value_type(signature.return_type))
    return x(x), codegen


@intrinsic
def _mantissa(typingctx, x):
    # x's significand as a float in [1, 2)
    def codegen(context, builder, signature, args):
        f32 = signature.return_type == types.float32
        ity = context.get_value_type(types.int32 if f32 else types.int64)
        i = builder.bitcast(args[0], ity)
        i = builder.and_(i, ity((1 << 23) - 1 if f32 else (1 << 52) - 1))
        i = builder.or_(i, ity(0x3F800000 if f32 else 0x3FF0000000000000))
        return builder.bitcast(i, context.get_value_type(signature.return_type))
    return x(x), codegen


@intrinsic
def _fma(typingctx, a, b, c):
    # a * b + c rounded once (llvm.fma: one instruction where the CPU has FMA)
    def codegen(context, builder, signature, args):
        return builder.fma(*args)
    return a(a, a, a), codegen


@intrinsic
def _sel(typingctx, c, a, b):
    # c ? a : b without a branch (llvm select), so that loops stay vectorisable
    def codegen(context, builder, signature, args):
        return builder.select(args[0], args[1], args[2])
    return a(types.boolean, a, a), codegen


# ---- float64: Cody-Waite reduction x = k ln2 + r, |r| <= ln2/2; expm1(r) by its Taylor series
# to r**13 (truncation < 1e-17 relative); fdlibm's e_log.c for log. Within 1-3 ulp of numpy.
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10


@njit(inline="always", error_model="numpy")
def _expm1_red(x, kf):
    r = (x - kf * _LN2_HI) - kf * _LN2_LO
    p = _fma(r, 1.0 / 6227020800, 1.0 / 479001600)
    p = _fma(r, p, 1.0 / 39916800)
    p = _fma(r, p, 1.0 / 3628800)
    p = _fma(r, p, 1.0 / 362880)
    p = _fma(r, p, 1.0 / 40320)
    p = _fma(r, p, 1.0 / 5040)
    p = _fma(r, p, 1.0 / 720)
    p = _fma(r, p, 1.0 / 120)
    p = _fma(r, p, 1.0 / 24)
    p = _fma(r, p, 1.0 / 6)
    p = _fma(r, p, 0.5)
    return _fma(r * r, p, r)


@njit(inline="always", error_model="numpy")
def _k(x):  # round(x / ln2), clamped (NaN too) so that 2**(k/2) stays normal
    kf = np.floor(x * 1.4426950408889634 + 0.5)
    kf = _sel(kf > -1100.0, kf, -1100.0)
    return _sel(kf < 1100.0, kf, 1100.0)


@njit(inline="always", error_model="numpy")
def _exp(x):
    kf = _k(x)
    q = _expm1_red(x, kf)
    k1 = np.floor(kf * 0.5)
    res = (1.0 + q) * _pow2(k1) * _pow2(kf - k1)  # two factors: results near overflow and subnormal ones
    res = _sel(x < 709.782712893384, res, np.inf)
    res = _sel(x > -745.1332191019412, res, 0.0)
    return _sel(x == x, res, x)


@njit(inline="always", error_model="numpy")
def _expm1(x):
    kf = _k(x)
    q = _expm1_red(x, kf)
    kc = _sel(kf < 1023.0, kf, 1023.0)
    s = _pow2(kc)
    res = _fma(s, q, s - 1.0)  # 2**k - 1 is exact for the k where it matters
    k1 = np.floor(kf * 0.5)
    res = _sel(kf < 1023.0, res, (1.0 + q) * _pow2(k1) * _pow2(kf - k1) - 1.0)
    res = _sel(kf == 0.0, q, res)
    res = _sel(x < 709.782712893384, res, np.inf)
    res = _sel(x > -50.0, res, -1.0)
    return _sel(x == x, res, x)


@njit(inline="always", error_model="numpy")
def _log(x):
    # x = 2**e * m, m in [sqrt(1/2), sqrt(2)); log(1 + f) as in fdlibm's e_log.c (< 1 ulp)
    tiny = x < 2.2250738585072014e-308
    xs = _sel(tiny, x * 18014398509481984.0, x)
    e = _exponent(xs) - _sel(tiny, 54.0, 0.0)
    m = _mantissa(xs)
    big = m > 1.4142135623730951
    m = _sel(big, m * 0.5, m)
    dk = _sel(big, e + 1.0, e)
    f = m - 1.0
    s = f / (2.0 + f)
    z = s * s
    w = z * z
    t1 = w * _fma(w, _fma(w, 1.531383769920937332e-01, 2.222219843214978396e-01), 3.999999999940941908e-01)
    t2 = z * _fma(w, _fma(w, _fma(w, 1.479819860511658591e-01, 1.818357216161805012e-01), 2.857142874366239149e-01),
                  6.666666666666735130e-01)
    R = t2 + t1
    hfsq = 0.5 * f * f
    res = dk * _LN2_HI - ((hfsq - (s * (hfsq + R) + dk * _LN2_LO)) - f)
    res = _sel(x < np.inf, res, np.inf)
    res = _sel(x != 0.0, res, -np.inf)
    res = _sel(x >= 0.0, res, np.nan)
    return _sel(x == x, res, x)


@njit(inline="always", error_model="numpy")
def _log1p(x):
    u = 1.0 + x
    d = u - 1.0
    res = _log(u) * (x / d)  # Goldberg: the rounding of 1 + x cancels
    res = _sel(d == 0.0, x, res)
    res = _sel(x < np.inf, res, np.inf)
    return _sel(x == x, res, x)


@njit(inline="always", error_model="numpy")
def _tanh(x):
    # e / (e + 2) with e = expm1(2x); |x| <= 20 (tanh(20) is 1 in float64) keeps 2**k normal
    xc = _sel(x > 20.0, 20.0, x)
    xc = _sel(xc < -20.0, -20.0, xc)  # NaN passes both
    t = 2.0 * xc
    kf = np.floor(t * 1.4426950408889634 + 0.5)
    kf = _sel(kf == kf, kf, 0.0)
    q = _expm1_red(t, kf)
    s = _pow2(kf)
    e = _sel(kf == 0.0, q, _fma(s, q, s - 1.0))
    return e / (e + 2.0)


@njit(inline="always", error_model="numpy")
def _logistic(x):
    return 0.5 * _tanh(x * 0.5) + 0.5  # as the numpy kernel: 0.5 * (1 + tanh(x / 2)), op by op


# ---- float32: the same algorithms in float32 arithmetic (16 lanes), shorter polynomials (the
# Taylor series to r**7; fdlibm's e_logf.c); within 1-3 float32 ulp of numpy
_F0 = np.float32(0.0)
_F1 = np.float32(1.0)
_F2 = np.float32(2.0)
_FH = np.float32(0.5)
_FINF = np.float32(np.inf)
_FNAN = np.float32(np.nan)
_FLOG2E = np.float32(1.4426950408889634)


@njit(inline="always", error_model="numpy")
def _expm1_red32(x, kf):
    r = _fma(kf, np.float32(-0.693359375), x)  # ln2 = 0.693359375 - 2.12194440e-4 (Cephes)
    r = _fma(kf, np.float32(2.12194440e-4), r)
    p = _fma(r, np.float32(1.0 / 5040), np.float32(1.0 / 720))
    p = _fma(r, p, np.float32(1.0 / 120))
    p = _fma(r, p, np.float32(1.0 / 24))
    p = _fma(r, p, np.float32(1.0 / 6))
    p = _fma(r, p, _FH)
    return _fma(r * r, p, r)


@njit(inline="always", error_model="numpy")
def _k32(x):
    kf = np.floor(x * _FLOG2E + _FH)
    kf = _sel(kf > np.float32(-200.0), kf, np.float32(-200.0))
    return _sel(kf < np.float32(200.0), kf, np.float32(200.0))


@njit(inline="always", error_model="numpy")
def _exp32(x):
    kf = _k32(x)
    q = _expm1_red32(x, kf)
    k1 = np.floor(kf * _FH)
    res = (_F1 + q) * _pow2(k1) * _pow2(kf - k1)
    res = _sel(x < np.float32(88.72283935546875), res, _FINF)
    res = _sel(x > np.float32(-103.97208), res, _F0)
    return _sel(x == x, res, x)


@njit(inline="always", error_model="numpy")
def _expm132(x):
    kf = _k32(x)
    q = _expm1_red32(x, kf)
    kc = _sel(kf < np.float32(127.0), kf, np.float32(127.0))
    s = _pow2(kc)
    res = _fma(s, q, s - _F1)
    k1 = np.floor(kf * _FH)
    res = _sel(kf < np.float32(127.0), res, (_F1 + q) * _pow2(k1) * _pow2(kf - k1) - _F1)
    res = _sel(kf == _F0, q, res)
    res = _sel(x < np.float32(88.72283935546875), res, _FINF)
    res = _sel(x > np.float32(-25.0), res, -_F1)
    return _sel(x == x, res, x)


@njit(inline="always", error_model="numpy")
def _log32(x):
    tiny = x < np.float32(1.17549435e-38)
    xs = _sel(tiny, x * np.float32(33554432.0), x)
    e = _exponent(xs) - _sel(tiny, np.float32(25.0), _F0)
    m = _mantissa(xs)
    big = m > np.float32(1.4142135623730951)
    m = _sel(big, m * _FH, m)
    dk = _sel(big, e + _F1, e)
    f = m - _F1
    s = f / (_F2 + f)
    z = s * s
    w = z * z
    t1 = w * _fma(w, np.float32(0.24279078841), np.float32(0.40000972152))
    t2 = z * _fma(w, np.float32(0.28498786688), np.float32(0.66666662693))
    R = t2 + t1
    hfsq = _FH * f * f
    res = dk * np.float32(6.9313812256e-01) - ((hfsq - (s * (hfsq + R) + dk * np.float32(9.0580006145e-06))) - f)
    res = _sel(x < _FINF, res, _FINF)
    res = _sel(x != _F0, res, -_FINF)
    res = _sel(x >= _F0, res, _FNAN)
    return _sel(x == x, res, x)


@njit(inline="always", error_model="numpy")
def _log1p32(x):
    u = _F1 + x
    d = u - _F1
    res = _log32(u) * (x / d)
    res = _sel(d == _F0, x, res)
    res = _sel(x < _FINF, res, _FINF)
    return _sel(x == x, res, x)


@njit(inline="always", error_model="numpy")
def _tanh32(x):
    xc = _sel(x > np.float32(9.0), np.float32(9.0), x)  # tanh(9) is 1 in float32
    xc = _sel(xc < np.float32(-9.0), np.float32(-9.0), xc)
    t = _F2 * xc
    kf = np.floor(t * _FLOG2E + _FH)
    kf = _sel(kf == kf, kf, _F0)
    q = _expm1_red32(t, kf)
    s = _pow2(kf)
    e = _sel(kf == _F0, q, _fma(s, q, s - _F1))
    return e / (e + _F2)


@njit(inline="always", error_model="numpy")
def _logistic32(x):
    return _FH * _tanh32(x * _FH) + _FH
'''


def compile_report() -> dict[str, Any]:
    """What this process has compiled or loaded (for cache_info / metrics): native kernels in
    memory, the kernel cache directory, numba's version or why it is missing."""
    return {"kernels_loaded": len(_kernels), "cache_dir": str(kernel_cache_dir()), "numba": numba_status()[1]}
