#!/usr/bin/env python
"""gradserve vs PyTorch (CPU autograd) vs JAX (jit) vs the BLAS floor: MLP and scalar gradients.

    python bench/mlp.py                       # everything, float32 and float64 (about a minute on 2 cores)
    python bench/mlp.py --repeat 20 --dtype float64 --json out.json
    python bench/mlp.py --smoke               # the same code at tiny sizes, a few seconds (run by the tests)

What is measured (see bench/README.md for how to read the table):

1. One forward + backward of an MLP, batch 256, 784 -> 1024 -> 1024 -> 10, tanh, softmax
   cross-entropy (mean), gradients of all six weights and biases. Contenders: `gs.grad(loss)`
   (cached plan), `torch.autograd.grad` over the six parameters, `jax.jit(jax.grad(loss))`
   (block_until_ready), and the BLAS floor: the same 8 matmuls alone in numpy (into preallocated
   outputs). The contenders take turns round-robin, many rounds (the first one rotates), so
   machine noise hits all alike: each turn sleeps --settle s, makes one untimed call, then
   times --block calls. The table shows medians. Gradients are checked against PyTorch's first.
2. Peak memory, gradserve vs PyTorch, each in a fresh child process: the growth of peak RSS
   (VmHWM, reset between phases) over the RSS after imports and input creation, for the first
   call, one later call, and --memory-loop calls back to back.
3. Per-call time of the scalar gradient `gs.grad(lambda x, y: x * y + gs.sin(x), argnums=(0, 1))(2.0, 3.0)`
   (cached) vs the same in PyTorch (two float64 scalar tensors, torch.autograd.grad) and
   jax.jit(jax.grad(...)) on Python floats; timeit, interleaved repeats, median per call.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import timeit
from collections.abc import Callable
from typing import Any

import numpy as np

BATCH, D_IN, D_H, D_OUT = MLP_SHAPE = (256, 784, 1024, 10)
SMOKE_SHAPE = (16, 24, 32, 10)  # --smoke: the same model, small enough to run in the tests
PARAM_NAMES = ("w1", "b1", "w2", "b2", "w3", "b3")
SEED = 0


# ---------------------------------------------------------------- problem: the same data for everybody


def make_problem(dtype: str, shape: tuple[int, int, int, int] = MLP_SHAPE
                 ) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    """Glorot-uniform weights, small random biases, standard normal inputs, int64 labels (seeded);
    `shape` is (batch, inputs, hidden, classes)."""
    rng = np.random.default_rng(SEED)
    dt = np.dtype(dtype)
    batch, d_in, d_h, d_out = shape

    def glorot(n_in: int, n_out: int) -> np.ndarray:
        lim = np.sqrt(6.0 / (n_in + n_out))
        return rng.uniform(-lim, lim, size=(n_in, n_out)).astype(dt)

    params = {
        "w1": glorot(d_in, d_h), "b1": (0.01 * rng.standard_normal(d_h)).astype(dt),
        "w2": glorot(d_h, d_h), "b2": (0.01 * rng.standard_normal(d_h)).astype(dt),
        "w3": glorot(d_h, d_out), "b3": (0.01 * rng.standard_normal(d_out)).astype(dt),
    }
    x = rng.standard_normal((batch, d_in)).astype(dt)
    y = rng.integers(0, d_out, size=batch, dtype=np.int64)
    return params, x, y


def shape_text(shape: tuple[int, int, int, int]) -> str:
    batch, d_in, d_h, d_out = shape
    return f"batch {batch}, {d_in} -> {d_h} -> {d_h} -> {d_out}"


# ---------------------------------------------------------------- contenders: each returns a no-arg step


def gradserve_step(params: dict, x: np.ndarray, y: np.ndarray) -> Callable[[], Any]:
    import gradserve as gs

    def loss(params, x, y):
        h = gs.tanh(x @ params["w1"] + params["b1"])
        h = gs.tanh(h @ params["w2"] + params["b2"])
        return gs.cross_entropy(h @ params["w3"] + params["b3"], y)

    g = gs.grad(loss)
    return lambda: g(params, x, y)


def torch_step(params: dict, x: np.ndarray, y: np.ndarray) -> Callable[[], Any]:
    import torch
    import torch.nn.functional as F

    tp = [torch.tensor(params[k], requires_grad=True) for k in PARAM_NAMES]
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)

    def step():
        w1, b1, w2, b2, w3, b3 = tp
        h = torch.tanh(tx @ w1 + b1)
        h = torch.tanh(h @ w2 + b2)
        loss = F.cross_entropy(h @ w3 + b3, ty)
        return dict(zip(PARAM_NAMES, torch.autograd.grad(loss, tp), strict=True))

    return step


def jax_step(params: dict, x: np.ndarray, y: np.ndarray) -> Callable[[], Any]:
    import jax
    import jax.numpy as jnp

    def loss(params, x, y):
        h = jnp.tanh(x @ params["w1"] + params["b1"])
        h = jnp.tanh(h @ params["w2"] + params["b2"])
        logp = jax.nn.log_softmax(h @ params["w3"] + params["b3"], axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

    g = jax.jit(jax.grad(loss))
    jp = {k: jnp.asarray(v) for k, v in params.items()}
    jx, jy = jnp.asarray(x), jnp.asarray(y)
    return lambda: jax.block_until_ready(g(jp, jx, jy))


def floor_step(params: dict, x: np.ndarray, y: np.ndarray) -> Callable[[], Any]:
    """The 8 matmuls of forward + backward with the MLP's shapes, alone, into preallocated outputs."""
    rng = np.random.default_rng(SEED + 1)
    dt = x.dtype
    w1, w2, w3 = params["w1"], params["w2"], params["w3"]
    (batch, d_in), (d_h, d_out) = x.shape, w3.shape
    h1 = np.tanh(rng.standard_normal((batch, d_h))).astype(dt)
    h2 = np.tanh(rng.standard_normal((batch, d_h))).astype(dt)
    g1 = rng.standard_normal((batch, d_h)).astype(dt)  # cotangent at the first pre-activation
    g2 = rng.standard_normal((batch, d_h)).astype(dt)
    g3 = rng.standard_normal((batch, d_out)).astype(dt)  # cotangent at the logits
    o_a1, o_a2, o_a3 = np.empty((batch, d_h), dt), np.empty((batch, d_h), dt), np.empty((batch, d_out), dt)
    o_dw3, o_dh2, o_dw2 = np.empty((d_h, d_out), dt), np.empty((batch, d_h), dt), np.empty((d_h, d_h), dt)
    o_dh1, o_dw1 = np.empty((batch, d_h), dt), np.empty((d_in, d_h), dt)
    mm = np.matmul

    def step():
        mm(x, w1, out=o_a1)         # forward
        mm(h1, w2, out=o_a2)
        mm(h2, w3, out=o_a3)
        mm(h2.T, g3, out=o_dw3)     # backward
        mm(g3, w3.T, out=o_dh2)
        mm(h1.T, g2, out=o_dw2)
        mm(g2, w2.T, out=o_dh1)
        mm(x.T, g1, out=o_dw1)
        return o_dw1

    return step


STEPS = {"gradserve": gradserve_step, "pytorch": torch_step, "jax": jax_step, "floor": floor_step}


def have_jax() -> bool:
    try:
        import jax  # noqa: F401
    except Exception:
        return False
    return True


def enable_jax_x64() -> None:
    import jax

    jax.config.update("jax_enable_x64", True)


# ---------------------------------------------------------------- timing


def summarize(samples: list[float], scale: float) -> dict[str, Any]:
    s = sorted(x * scale for x in samples)
    q = statistics.quantiles(s, n=4) if len(s) >= 2 else [s[0]] * 3
    return {"median": statistics.median(s), "min": s[0], "p25": q[0], "p75": q[2], "n": len(s)}


def time_interleaved(steps: dict[str, Callable[[], Any]], rounds: int, block: int, settle: float,
                     warmup: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Round-robin over the contenders, `rounds` times, starting one further along each round.

    Each turn sleeps `settle` seconds, makes one untimed call, then times `block` calls back to
    back. The sleep matters on a small machine: after a call, numpy's OpenBLAS worker threads
    spin for tens of ms (and libgomp's, for torch, a few ms) before sleeping, and that spinning
    steals a core from whichever library runs next.
    Returns the per-call times and each contender's minor page faults per timed call.
    """
    names = list(steps)
    for _ in range(warmup):
        for n in names:
            steps[n]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    faults = dict.fromkeys(names, 0)
    clock = time.perf_counter
    gc.collect()
    for r in range(rounds):
        for i in range(len(names)):
            n = names[(r + i) % len(names)]
            fn = steps[n]
            if settle > 0:
                time.sleep(settle)
                fn()
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(block):
                t0 = clock()
                fn()
                samples[n].append(clock() - t0)
            faults[n] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    return samples, {n: faults[n] / max(1, rounds * block) for n in names}


class ForeignLoad:
    """CPU time that other processes used while we ran (from /proc/stat minus our own usage)."""

    def __init__(self) -> None:
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy(), self._own()

    @staticmethod
    def _busy() -> float | None:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait

    @staticmethod
    def _own() -> float:
        ru, rc = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return ru.ru_utime + ru.ru_stime + rc.ru_utime + rc.ru_stime

    def cores(self) -> float | None:
        """Average number of cores busy with other processes since construction."""
        busy = self._busy()
        if busy is None or self.busy0 is None:
            return None
        return max(0.0, (busy - self.busy0) - (self._own() - self.own0)) / max(time.perf_counter() - self.t0, 1e-9)


def check_grads(params: dict, x: np.ndarray, y: np.ndarray, contenders: list[str]) -> dict[str, Any]:
    """Max |difference| of each contender's gradients from PyTorch's, over all six parameters."""
    ref = {k: v.detach().numpy() for k, v in torch_step(params, x, y)().items()}
    scale = max(float(np.max(np.abs(v))) for v in ref.values())
    out: dict[str, Any] = {"max_abs_grad": scale}
    for name in contenders:
        if name in ("pytorch", "floor"):
            continue
        got = {k: np.asarray(v) for k, v in STEPS[name](params, x, y)().items()}
        out[name] = {
            "max_abs_diff": max(float(np.max(np.abs(got[k].astype(np.float64) - ref[k]))) for k in PARAM_NAMES),
            "shapes_ok": all(got[k].shape == ref[k].shape and got[k].dtype == ref[k].dtype for k in PARAM_NAMES),
        }
    return out


# ---------------------------------------------------------------- memory, in a fresh child process


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; Linux >= 4.0."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def memory_child(lib: str, dtype: str, loop: int, shape: tuple[int, int, int, int] = MLP_SHAPE) -> dict[str, Any]:
    """Run in the child: imports and inputs first, then the peak-RSS growth over the RSS just
    before each phase: `cold` (the first call: tracing, planning, lazy init included), `warm`
    (a second call, alone) and `loop` (`loop` calls back to back, each result dropped before the
    next, no gc.collect() in between: what a training loop sees); and each phase's minor page
    faults per call, in a process that imports only its own library."""
    if lib == "pytorch":
        import torch  # noqa: F401
    else:
        import gradserve  # noqa: F401
    params, x, y = make_problem(dtype, shape)
    step = STEPS[lib](params, x, y)
    res: dict[str, Any] = {"lib": lib, "dtype": dtype, "loop_calls": loop}
    for phase, calls in (("cold", 1), ("warm", 1), ("loop", loop)):
        gc.collect()
        resettable = _reset_peak()
        if not resettable and phase != "cold":
            res[phase] = None  # the peak mark cannot be reset: only the first call is measurable
            continue
        base = max(_rss_bytes(), _peak_bytes()) if not resettable else _rss_bytes()
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(calls):
            out = step()
            del out
        res[f"{phase}_faults_per_call"] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / calls
        res[phase] = _peak_bytes() - base
        res[f"{phase}_retained"] = _rss_bytes() - base  # still resident after the phase
    if lib == "gradserve":  # cross-check: numpy's allocations during one warm step, by tracemalloc
        import tracemalloc

        gc.collect()
        tracemalloc.start()
        out = step()
        res["tracemalloc_peak"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        del out
    return res


def measure_memory(lib: str, dtype: str, loop: int, smoke: bool = False) -> dict[str, Any]:
    # A fixed mmap threshold disables glibc's dynamic one, so every large buffer is mmapped and
    # returned to the OS when freed: RSS then follows live memory instead of malloc's free lists.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", lib, "--dtype", dtype,
           "--memory-loop", str(loop)] + (["--smoke"] if smoke else [])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"memory child {lib} {dtype} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def live_set_bytes(dtype: str, shape: tuple[int, int, int, int] = MLP_SHAPE) -> int:
    """A lower bound of a step's peak for whole-array kernels: the six gradients (returned, so
    alive at the end) plus the (batch, hidden) cotangent that the last big weight gradient
    (x.T @ g1, or h1.T @ g2) reads while its output is written."""
    batch, d_in, d_h, d_out = shape
    n_grads = d_in * d_h + d_h + d_h * d_h + d_h + d_h * d_out + d_out
    return (n_grads + batch * d_h) * np.dtype(dtype).itemsize


# ---------------------------------------------------------------- scalar gradient


def scalar_calls(contenders: list[str]) -> dict[str, Callable[[], Any]]:
    calls: dict[str, Callable[[], Any]] = {}
    import gradserve as gs

    def f(x, y):
        return x * y + gs.sin(x)

    gs_g = gs.grad(f, argnums=(0, 1))
    calls["gradserve"] = lambda: gs_g(2.0, 3.0)
    if "pytorch" in contenders:
        import torch

        def torch_call():
            a = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
            b = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
            return torch.autograd.grad(a * b + torch.sin(a), (a, b))

        calls["pytorch"] = torch_call
    if "jax" in contenders:
        import jax
        import jax.numpy as jnp

        jg = jax.jit(jax.grad(lambda x, y: x * y + jnp.sin(x), argnums=(0, 1)))
        calls["jax"] = lambda: jax.block_until_ready(jg(2.0, 3.0))
    return calls


def time_scalar(calls: dict[str, Callable[[], Any]], repeat: int, number: int) -> dict[str, list[float]]:
    """timeit of `number` calls per sample, samples interleaved round-robin; seconds per call."""
    for fn in calls.values():
        for _ in range(50):
            fn()
    timers = {n: timeit.Timer(fn) for n, fn in calls.items()}
    names = list(calls)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeat):
        for i in range(len(names)):
            n = names[(r + i) % len(names)]
            samples[n].append(timers[n].timeit(number) / number)
    return samples


# ---------------------------------------------------------------- report


def environment() -> dict[str, Any]:
    import threadpoolctl

    info: dict[str, Any] = {
        "python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
        "numpy": np.__version__,
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith(("OPENBLAS_", "OMP_", "MKL_", "XLA_"))},
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        info["cpu"] = platform.processor() or "?"
    import gradserve

    info["gradserve"] = getattr(gradserve, "__version__", "?")
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["torch_blas"] = "MKL" if torch.backends.mkl.is_available() else "?"
    except ImportError:
        pass
    if have_jax():
        import jax

        info["jax"] = jax.__version__
        info["jax_devices"] = [str(d) for d in jax.devices()]
    info["threadpools"] = [
        {k: p.get(k) for k in ("user_api", "internal_api", "prefix", "version", "num_threads", "architecture",
                                "threading_layer", "filepath")}
        for p in threadpoolctl.threadpool_info()
    ]
    return info


def foreign_note(cores: float | None) -> str:
    if cores is None:
        return ""
    warn = "  WARNING: other processes were busy, numbers are noisy" if cores > 0.1 else ""
    return f"; other processes used {cores:.2f} cores meanwhile{warn}"


def fmt(v: float | None, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def table(results: dict[str, Any]) -> str:
    head = ["", "gradserve", "PyTorch", "JAX", "BLAS floor", "gradserve / PyTorch", "gradserve / JAX",
            "gradserve / floor", "PyTorch / floor", "JAX / floor"]
    rows = [head, ["---"] + ["---:"] * (len(head) - 1)]
    for dt, r in results["mlp"].items():
        m = {n: r["time_ms"][n]["median"] if n in r["time_ms"] else None for n in STEPS}
        rows.append([f"MLP fwd+bwd, {dt}, median ms"] + [fmt(m[n]) for n in STEPS] + [
            fmt(ratio(m["gradserve"], m["pytorch"])), fmt(ratio(m["gradserve"], m["jax"])),
            fmt(ratio(m["gradserve"], m["floor"])), fmt(ratio(m["pytorch"], m["floor"])),
            fmt(ratio(m["jax"], m["floor"]))])
    for dt, r in results.get("memory", {}).items():
        mb = 1 / 2**20
        floor = r["live_set_bytes"] * mb
        labels = {"warm": "one step (warm)", "cold": "first call (cold)",
                  "loop": f"{r['gradserve'].get('loop_calls', '?')} back-to-back steps"}
        for phase, label in labels.items():
            g, t = (r[lib].get(phase) for lib in ("gradserve", "pytorch"))
            if g is None and t is None:
                continue
            g, t = (None if v is None else v * mb for v in (g, t))
            rows.append([f"peak RSS growth, {label}, {dt}, MiB", fmt(g, 1), fmt(t, 1), "—", f"{floor:.1f} (live set)",
                         fmt(ratio(g, t)), "—", fmt(ratio(g, floor)), fmt(ratio(t, floor)), "—"])
    if "scalar" in results:
        s = {n: results["scalar"]["time_us"][n]["median"] if n in results["scalar"]["time_us"] else None
             for n in ("gradserve", "pytorch", "jax")}
        rows.append(["scalar grad `x*y + sin(x)`, float64, µs/call", fmt(s["gradserve"], 1), fmt(s["pytorch"], 1),
                     fmt(s["jax"], 1), "—", fmt(ratio(s["gradserve"], s["pytorch"])),
                     fmt(ratio(s["gradserve"], s["jax"])), "—", "—", "—"])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def print_environment(info: dict[str, Any]) -> None:
    print(f"# machine: {info['cpu']}, {info['cpus']} CPUs, {info['platform']}")
    print(f"# python {info['python']}, numpy {info['numpy']}, gradserve {info['gradserve']}, "
          f"torch {info.get('torch', '-')} ({info.get('torch_threads', '-')} threads, BLAS {info.get('torch_blas', '-')}), "
          f"jax {info.get('jax', '-')} {info.get('jax_devices', '')}")
    print(f"# environment: {info['env'] or '(no OPENBLAS_/OMP_/MKL_/XLA_ variables)'}")
    print("# threadpoolctl:")
    for p in info["threadpools"]:
        print(f"#   {p['user_api']}: {p['internal_api']} {p['version']} ({p['prefix']}), {p['num_threads']} threads"
              + (f", {p['architecture']}" if p.get("architecture") else "")
              + (f", {p['threading_layer']}" if p.get("threading_layer") else "") + f"  [{p['filepath']}]")


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=12, help="interleaved rounds of the MLP timing (default 12)")
    ap.add_argument("--block", type=int, default=5, help="timed calls per contender per round (default 5)")
    ap.add_argument("--settle", type=float, default=0.25,
                    help="seconds of sleep before each contender's turn, for the previous one's idle BLAS/OpenMP "
                         "threads to stop spinning (default 0.25; 0 with --block 1 is plain per-call round-robin)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed calls of each contender first (default 5)")
    ap.add_argument("--dtype", default="float32,float64", help="comma-separated dtypes (default float32,float64)")
    ap.add_argument("--no-jax", action="store_true", help="leave JAX out even when it is importable")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    ap.add_argument("--memory-loop", type=int, default=50,
                    help="back-to-back calls in the memory children's loop phase (default 50)")
    ap.add_argument("--scalar-repeat", type=int, default=25, help="timeit samples per scalar contender (default 25)")
    ap.add_argument("--scalar-number", type=int, default=1000, help="calls per timeit sample (default 1000)")
    ap.add_argument("--json", metavar="PATH", help="also write every number (and the environment) here")
    ap.add_argument("--smoke", action="store_true",
                    help=f"{shape_text(SMOKE_SHAPE)} and a few calls per measurement: the same code in seconds, "
                         "for the tests (the numbers mean nothing; options given explicitly still apply)")
    ap.add_argument("--memory-child", choices=("gradserve", "pytorch"), help=argparse.SUPPRESS)
    if ap.parse_known_args(argv)[0].smoke:
        ap.set_defaults(repeat=2, block=2, settle=0.0, warmup=1, memory_loop=3, scalar_repeat=3, scalar_number=20)
    args = ap.parse_args(argv)
    shape = SMOKE_SHAPE if args.smoke else MLP_SHAPE
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    for d in dtypes:
        if d not in ("float32", "float64"):
            ap.error(f"unsupported dtype {d!r}: use float32 and/or float64")

    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, dtypes[0], args.memory_loop, shape)))
        return 0

    t_start = time.perf_counter()
    use_jax = not args.no_jax and have_jax()
    if use_jax:
        enable_jax_x64()  # float64 runs need it; float32 inputs stay float32
    contenders = ["gradserve", "pytorch"] + (["jax"] if use_jax else []) + ["floor"]
    info = environment()
    print_environment(info)
    if not use_jax:
        print("# JAX: " + ("left out (--no-jax)" if args.no_jax else "not importable, left out"))
    if args.smoke:
        print(f"# smoke run: {shape_text(shape)}, {args.repeat} rounds of {args.block} calls: "
              "checks that everything runs, the numbers mean nothing")
    results: dict[str, Any] = {"environment": info, "config": vars(args) | {"contenders": contenders}, "mlp": {}}

    for dt in dtypes:
        params, x, y = make_problem(dt, shape)
        check = check_grads(params, x, y, contenders)
        tol = 1e-10 if dt == "float64" else None
        gs_diff = check["gradserve"]["max_abs_diff"]
        ok = check["gradserve"]["shapes_ok"] and (tol is None or gs_diff <= tol)
        check["gradserve"]["ok"] = ok
        line = f"# {dt}: gradserve vs PyTorch gradients: max |diff| = {gs_diff:.3g} (max |grad| {check['max_abs_grad']:.3g})"
        line += f", {'OK' if ok else 'MISMATCH'}" + (f" (tolerance {tol:g})" if tol else " (shapes and dtypes match)")
        if "jax" in check:
            line += f"; JAX vs PyTorch: {check['jax']['max_abs_diff']:.3g}"
        print(line, flush=True)
        steps = {n: STEPS[n](params, x, y) for n in contenders}
        load = ForeignLoad()
        samples, faults = time_interleaved(steps, args.repeat, args.block, args.settle, args.warmup)
        results["mlp"][dt] = {"grad_check": check, "time_ms": {n: summarize(s, 1e3) for n, s in samples.items()},
                              "minor_page_faults_per_call": faults, "foreign_load_cores": load.cores()}
        tm = results["mlp"][dt]["time_ms"]
        print(f"# {dt}: median [p25-p75] ms: " + ", ".join(
            f"{n} {tm[n]['median']:.2f} [{tm[n]['p25']:.2f}-{tm[n]['p75']:.2f}]" for n in contenders)
            + foreign_note(results["mlp"][dt]["foreign_load_cores"]), flush=True)
        print(f"# {dt}: minor page faults per call: " + ", ".join(f"{n} {v:.0f}" for n, v in faults.items()), flush=True)
        del steps, params, x, y
        gc.collect()

    if not args.no_memory:
        results["memory"] = {}
        for dt in dtypes:
            r = {lib: measure_memory(lib, dt, args.memory_loop, args.smoke) for lib in ("gradserve", "pytorch")}
            r["live_set_bytes"] = live_set_bytes(dt, shape)
            results["memory"][dt] = r
            print(f"# {dt}: peak RSS growth (MiB) warm / cold / {args.memory_loop} back-to-back: " + ", ".join(
                f"{lib} " + " / ".join(fmt(None if r[lib][ph] is None else r[lib][ph] / 2**20, 1)
                                       for ph in ("warm", "cold", "loop"))
                for lib in ("gradserve", "pytorch"))
                + f"; gradserve's numpy allocations by tracemalloc, one warm step: "
                  f"{r['gradserve']['tracemalloc_peak'] / 2**20:.1f}", flush=True)
            print(f"# {dt}: minor page faults per call, {args.memory_loop} back-to-back, each library in a process of "
                  f"its own: " + ", ".join(f"{lib} {r[lib]['loop_faults_per_call']:.0f}" for lib in ("gradserve", "pytorch")),
                  flush=True)

    calls = scalar_calls(contenders)
    vals = {n: tuple(float(v) for v in fn()) for n, fn in calls.items()}
    load = ForeignLoad()
    samples = time_scalar(calls, args.scalar_repeat, args.scalar_number)
    results["scalar"] = {"values": vals, "time_us": {n: summarize(s, 1e6) for n, s in samples.items()},
                         "foreign_load_cores": load.cores()}
    print("# scalar grad at (2, 3): " + ", ".join(f"{n} {v}" for n, v in vals.items()), flush=True)
    ts = results["scalar"]["time_us"]
    print("# scalar median [p25-p75] µs/call: " + ", ".join(
        f"{n} {ts[n]['median']:.2f} [{ts[n]['p25']:.2f}-{ts[n]['p75']:.2f}]" for n in ts)
        + foreign_note(results["scalar"]["foreign_load_cores"]), flush=True)

    results["wall_s"] = time.perf_counter() - t_start
    print()
    md = table(results)
    print(md)
    print(f"\n# {results['wall_s']:.0f} s in all")
    mismatched = [dt for dt, r in results["mlp"].items() if not r["grad_check"]["gradserve"]["ok"]]
    if mismatched:
        print(f"# ERROR: gradserve's gradients differ from PyTorch's for {', '.join(mismatched)}", file=sys.stderr)
    results["table_markdown"] = md
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
            f.write("\n")
    return 1 if mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
