#!/usr/bin/env python
"""gradserve's numpy kernels vs its native (fused, numba) kernels vs PyTorch CPU.

    python bench/native.py                    # both workloads and the threshold sweep (about 1-2 minutes on 2 cores)
    python bench/native.py --dtype float32 --repeat 6 --json out.json
    python bench/native.py --only threshold   # only the sweep behind native.AUTO_MIN_ELEMENTS and plan.PARALLEL_MIN_WORK
    python bench/native.py --only softmax --repeat 30   # the softmax cross-entropy's plans before and after max epilogues
    python bench/native.py --smoke            # every part at tiny sizes, seconds once numba's cache is warm (the tests)

Workloads, each forward + backward, gradients checked against each other before timing:

1. MLP: batch 256, 784 -> 1024 -> 1024 -> 10, tanh, softmax cross-entropy, gradients of all
   six weights and biases (bench/mlp.py's problem and PyTorch contender).
2. Elementwise-heavy: a 50-op elementwise chain over a 4096 x 1024 float32 array `x` with a
   1024-vector `w` (5 blocks of `a = tanh(h*w + 0.1); h = log1p(exp(-0.5 a)) * sigmoid(a) - 0.25 h`),
   loss `sum(chain(x, w))`, gradients for x and w.

Contenders: gradserve with the numpy kernels (the default), gradserve with `kernels="native"`
(every fused group compiled with numba), with `kernels="auto"` (only large groups compiled), and
PyTorch (CPU autograd, default threads). The gradserve contenders call `gs.grad`-style cached
plans (`Functional` over an `Engine(kernels=mode)`). Timing is bench/mlp.py's: contenders take
turns round-robin, each turn sleeps --settle s, makes one untimed call, then times --block calls;
medians are shown.

It also prints where each plan's time goes (per-step timings summed by kind: fused groups,
matrix products, reductions, the rest) and the compile time of the native plans, cold (empty
kernel cache) and warm (numba's disk cache).

3. Threshold sweep: two small fused groups (bias-add + tanh; tanh's VJP `g * (1 - y*y)`) at
   1 Ki .. 1 Mi elements, numpy vs native, one thread and the pool: where native starts to win.
4. Softmax cross-entropy (`--only softmax`): `cross_entropy(h @ w + b, y)` and its gradients
   for w and b, logits 4096 x 1000 float32 (h 4096 x 256), three native plans of the same graph
   taking turns: as fusion planned it before max/min epilogues and recomputation (sums the only
   epilogues, `fusion.EPILOGUE_OPS`; nothing recomputed, `fusion.MAX_RECOMPUTED` 0), with max/min
   epilogues, and with both (today's plan). Whole plans (bench/mlp.py's turns) and their steps
   other than matmuls (step by step, interleaved rounds, each round's calls summed step by step).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from gradserve_engine.ops import PRIMITIVES
from gradserve_engine.plan import FusedStep

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mlp as mlpbench

CHAIN_SHAPE = (4096, 1024)
CHAIN_BLOCKS = 5  # 10 elementwise ops each
SWEEP_SIZES = (1 << 10, 1 << 12, 1 << 14, 1 << 15, 1 << 16, 1 << 18, 1 << 20)
SWEEP_REPEAT, SWEEP_ELEMENTS = 7, 200_000  # best of 7 samples, each about SWEEP_ELEMENTS elements' worth of calls
# --smoke: every part with the same code at sizes that run in seconds (numba's compiles aside)
SOFTMAX_SHAPE = (4096, 256, 1000)  # batch, features, classes
SMOKE = {"shape": mlpbench.SMOKE_SHAPE, "chain_shape": (64, 32), "chain_blocks": 1, "sweep_sizes": (1 << 10, 1 << 12),
         "sweep_repeat": 2, "sweep_elements": 4096, "softmax_shape": (64, 16, 10)}
FULL = {"shape": mlpbench.MLP_SHAPE, "chain_shape": CHAIN_SHAPE, "chain_blocks": CHAIN_BLOCKS, "sweep_sizes": SWEEP_SIZES,
        "sweep_repeat": SWEEP_REPEAT, "sweep_elements": SWEEP_ELEMENTS, "softmax_shape": SOFTMAX_SHAPE}
MODES = ("numpy", "native", "auto")


# ---------------------------------------------------------------- gradserve with chosen kernels


def functional(mode: str) -> Any:
    """A `Functional` (gs.grad & co.) over an `Engine(kernels=mode)`: "numpy", "native" or "auto"."""
    from gradserve.api import Functional
    from gradserve_engine.engine import Engine

    return Functional(Engine(kernels=mode))


def mlp_loss(params, x, y):
    import gradserve as gs

    h = gs.tanh(x @ params["w1"] + params["b1"])
    h = gs.tanh(h @ params["w2"] + params["b2"])
    return gs.cross_entropy(h @ params["w3"] + params["b3"], y)


def chain(h, w, lib, blocks: int = CHAIN_BLOCKS):
    for _ in range(blocks):
        a = lib.tanh(h * w + 0.1)
        h = lib.log1p(lib.exp(a * -0.5)) * lib.sigmoid(a) - h * 0.25
    return h


def chain_problem(shape: tuple[int, int] = CHAIN_SHAPE) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(mlpbench.SEED)
    return (rng.standard_normal(shape).astype(np.float32),
            rng.uniform(0.5, 1.5, shape[1]).astype(np.float32))


def chain_loss_of(blocks: int) -> Callable[[Any, Any], Any]:
    """The loss `sum(chain(x, w))` with `blocks` blocks of the chain."""
    def chain_loss(x, w):
        import gradserve as gs

        return gs.sum(chain(x, w, gs, blocks))

    return chain_loss


def torch_chain_step(x: np.ndarray, w: np.ndarray, blocks: int = CHAIN_BLOCKS) -> Callable[[], Any]:
    import torch

    tx, tw = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)

    def step():
        loss = chain(tx, tw, torch, blocks).sum()
        gx, gw = torch.autograd.grad(loss, [tx, tw])
        return {"x": gx, "w": gw}

    return step


# ---------------------------------------------------------------- where the time goes


def profile(plan: Any, feed: dict[str, Any], repeat: int = 5) -> dict[str, float]:
    """Median ms per step kind over `repeat` runs of the plan, step by step."""
    totals: dict[str, list[float]] = {}
    for _ in range(repeat):
        env = [None] * plan.n_slots
        for name, slot in plan.inputs:
            env[slot] = feed[name]
        for slot, c in plan.constants:
            env[slot] = c
        acc: dict[str, float] = {}
        with np.errstate(all="ignore"):
            for step in plan.steps:
                t0 = time.perf_counter()
                step.run(env)
                if isinstance(step, FusedStep):
                    kind = f"fused ({plan.kernel_mode})"
                else:
                    op = step.unit.op
                    kind = ("matmul" if op == "matmul" else "reductions" if op.startswith("reduce")
                            else "elementwise (unfused)" if PRIMITIVES[op].elementwise else "views and other")
                acc[kind] = acc.get(kind, 0.0) + time.perf_counter() - t0
                for f in step.frees:
                    env[f] = None
        for k, v in acc.items():
            totals.setdefault(k, []).append(v * 1e3)
    return {k: statistics.median(v) for k, v in sorted(totals.items())}


# ---------------------------------------------------------------- workloads


def run_workload(name: str, steps: dict[str, Callable[[], Any]], plans: dict[str, Any], feed: dict[str, Any],
                 args: argparse.Namespace) -> dict[str, Any]:
    load = mlpbench.ForeignLoad()
    samples, _ = mlpbench.time_interleaved(steps, args.repeat, args.block, args.settle, args.warmup)
    cores = load.cores()
    tm = {n: mlpbench.summarize(s, 1e3) for n, s in samples.items()}
    print(f"# {name}: median [p25-p75] ms: " + ", ".join(
        f"{n} {tm[n]['median']:.2f} [{tm[n]['p25']:.2f}-{tm[n]['p75']:.2f}]" for n in tm)
        + mlpbench.foreign_note(cores), flush=True)
    prof = {k: profile(p, feed) for k, p in plans.items()}
    for k, p in prof.items():
        print(f"# {name}: {k} plan, ms per step kind (step by step): "
              + ", ".join(f"{kind} {ms:.2f}" for kind, ms in p.items()), flush=True)
    return {"time_ms": tm, "foreign_load_cores": cores, "profile_ms": prof}


def grads_close(a: dict, b: dict, rtol: float) -> float:
    """Largest |a - b| / max(|b|) over the gradients (relative to each gradient's scale)."""
    worst = 0.0
    for k in b:
        ga = np.asarray(a[k].detach().numpy() if hasattr(a[k], "detach") else a[k], dtype=np.float64)
        gb = np.asarray(b[k].detach().numpy() if hasattr(b[k], "detach") else b[k], dtype=np.float64)
        worst = max(worst, float(np.max(np.abs(ga - gb)) / max(np.max(np.abs(gb)), 1e-30)))
    return worst


def plans_of(api: Any) -> list[Any]:
    return list(api.backend._plans.values())


def mlp_workload(dtype: str, args: argparse.Namespace) -> dict[str, Any]:
    params, x, y = mlpbench.make_problem(dtype, args.sizes["shape"])
    apis = {mode: functional(mode) for mode in MODES}
    grads = {k: api.grad(mlp_loss) for k, api in apis.items()}
    t0 = time.perf_counter()
    got = {k: g(params, x, y) for k, g in grads.items()}
    first_call = time.perf_counter() - t0
    torch_step = mlpbench.torch_step(params, x, y)
    ref = torch_step()
    tol = 1e-10 if dtype == "float64" else 1e-4
    check = {k: grads_close(v, ref, tol) for k, v in got.items()}
    ok = all(v <= tol for v in check.values())
    print(f"# MLP {dtype}: gradients vs PyTorch, max relative |diff|: "
          + ", ".join(f"{k} {v:.2g}" for k, v in check.items()) + (" OK" if ok else f" MISMATCH (tolerance {tol:g})"))
    native_plan = plans_of(apis["native"])[0]
    print(f"# MLP {dtype}: native plan: {native_plan.kernel_info()}; first calls (trace, plan, compile): {first_call:.2f} s")
    steps = {"numpy": lambda: grads["numpy"](params, x, y), "native": lambda: grads["native"](params, x, y),
             "auto": lambda: grads["auto"](params, x, y), "pytorch": torch_step}
    feed = {"x": x, "y": y, **{f"params.{k}": v for k, v in params.items()}}
    plans = {k: plans_of(api)[0] for k, api in apis.items()}
    r = run_workload(f"MLP {dtype}", steps, plans, feed, args)
    return r | {"grad_check": check, "ok": ok, "native": native_plan.kernel_info()}


def chain_workload(args: argparse.Namespace) -> dict[str, Any]:
    from gradserve_engine.native import NativeKernels

    x, w = chain_problem(args.sizes["chain_shape"])
    chain_loss = chain_loss_of(args.sizes["chain_blocks"])
    apis = {mode: functional(mode) for mode in MODES}
    grads = {k: api.grad(chain_loss, argnums=(0, 1)) for k, api in apis.items()}
    got = {}
    for k, g in grads.items():
        gx, gw = g(x, w)
        got[k] = {"x": gx, "w": gw}
    torch_step = torch_chain_step(x, w, args.sizes["chain_blocks"])
    ref = torch_step()
    check = {k: grads_close(v, ref, 1e-4) for k, v in got.items()}
    ok = all(v <= 1e-4 for v in check.values())
    nodes = len(apis["numpy"].trace(chain_loss, x, w).nodes)
    native_plan = plans_of(apis["native"])[0]
    print(f"# chain: {nodes - 1} elementwise ops forward + the sum; float32 {x.shape}; gradients vs PyTorch, "
          "max relative |diff|: " + ", ".join(f"{k} {v:.2g}" for k, v in check.items()) + (" OK" if ok else " MISMATCH"))
    print(f"# chain: native plan: {native_plan.kernel_info()}")
    # the same gradient with the native kernels' loops on one thread: what the pool's threads buy
    one_api = functional("native")
    one_api.backend.kernels = NativeKernels(threads=1)
    one_grad = one_api.grad(chain_loss, argnums=(0, 1))
    for name, a, b in zip("xw", one_grad(x, w), got["native"].values(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"chain, native 1 thread: {name}")
    steps = {"numpy": lambda: grads["numpy"](x, w), "native": lambda: grads["native"](x, w),
             "native 1 thread": lambda: one_grad(x, w), "auto": lambda: grads["auto"](x, w), "pytorch": torch_step}
    plans = {k: plans_of(api)[0] for k, api in apis.items()} | {"native 1 thread": plans_of(one_api)[0]}
    assert plans["native 1 thread"].kernel_set.threads == 1
    r = run_workload("chain", steps, plans, {"x": x, "w": w}, args)
    tm = r["time_ms"]
    speedup = tm["native 1 thread"]["median"] / tm["native"]["median"]
    print(f"# chain: native on {native_plan.kernel_set.threads} threads is {speedup:.2f}x as fast as on 1 thread")
    return r | {"grad_check": check, "ok": ok, "native": native_plan.kernel_info(), "threads_speedup": speedup}


def compile_times(args: argparse.Namespace) -> dict[str, float]:
    """Plan build time of the native MLP (float32) and chain plans with an empty kernel cache
    (numba compiles) and then again in a fresh process-level cache state (numba loads)."""
    import gradserve as gs
    from gradserve_engine import autodiff, native
    from gradserve_engine.passes import optimize
    from gradserve_engine.plan import Plan

    params, x, y = mlpbench.make_problem("float32", args.sizes["shape"])
    cx, cw = chain_problem(args.sizes["chain_shape"])
    graphs = {
        "mlp": optimize(autodiff.grad_only(gs.trace(mlp_loss, params, x, y), [f"params.{k}" for k in params], "out",
                                           keep_outputs=True)),
        "chain": optimize(autodiff.grad_only(gs.trace(chain_loss_of(args.sizes["chain_blocks"]), cx, cw), ["x", "w"],
                                             "out", keep_outputs=True)),
    }
    out: dict[str, float] = {}
    tmp = Path(tempfile.mkdtemp(prefix="gradserve-kernels-"))
    try:
        for phase in ("cold", "warm"):
            native._kernels.clear()  # forget the in-process dispatchers: warm loads from numba's disk cache
            ks = native.NativeKernels(min_elements=0, cache_dir=tmp)
            for name, g in graphs.items():
                out[f"{name} {phase}"] = Plan(g, kernels=ks).compile_seconds
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        native._kernels.clear()
    print("# native compile seconds (plan build): " + ", ".join(f"{k} {v:.2f}" for k, v in out.items()), flush=True)
    return out


def threshold_sweep(args: argparse.Namespace) -> list[dict[str, Any]]:
    from gradserve_engine.ir import Builder
    from gradserve_engine.native import NativeKernels
    from gradserve_engine.plan import Plan

    def graph(kind: str, dt: str, rows: int, cols: int):
        b = Builder()
        x = b.input("x", dt, (rows, cols))
        if kind == "bias+tanh":
            bias = b.input("b", dt, (cols,))
            return b.build([("y", b.bind("tanh", b.bind("add", x, bias)))])
        g = b.input("g", dt, (rows, cols))
        one = b.const(np.ones((), dt))
        return b.build([("y", b.bind("mul", g, b.bind("sub", one, b.bind("mul", x, x))))])

    def sliced(g):  # numpy's kernels with every elementwise step in slices on the thread pool
        plan = Plan(g, parallel_min_work=0)
        for step in plan.sliceable:
            step.sliced = True
        return plan

    kernel_sets = {"native 1 thread": NativeKernels(threads=1), "native pool": NativeKernels()}
    rows_out = []
    repeat = args.sizes["sweep_repeat"]
    print(f"# threshold sweep: best-of-{repeat} µs per call (numpy / numpy in slices on threads / native 1 thread / "
          "native pool)")
    for dt in ("float32", "float64"):
        for kind in ("bias+tanh", "tanh-vjp"):
            line = []
            for n in args.sizes["sweep_sizes"]:
                cols = min(n, 1024)
                g = graph(kind, dt, n // cols, cols)
                rng = np.random.default_rng(0)
                feed = {i.name: rng.standard_normal(i.shape).astype(dt) for i in g.inputs}
                res = {}
                plans = (("numpy", Plan(g, parallel_min_work=math.inf)), ("numpy slices", sliced(g)),
                         *((k, Plan(g, kernels=ks)) for k, ks in kernel_sets.items()))
                for name, plan in plans:
                    plan.run(feed)
                    number = max(1, args.sizes["sweep_elements"] // n)
                    res[name] = min(timeit.repeat(lambda p=plan, f=feed: p.run(f), number=number, repeat=repeat)) / number * 1e6
                rows_out.append({"dtype": dt, "group": kind, "elements": n, "us": res})
                line.append(f"{n}: {res['numpy']:.1f}/{res['numpy slices']:.1f}/{res['native 1 thread']:.1f}/"
                            f"{res['native pool']:.1f}")
            print(f"#   {dt} {kind}: " + "  ".join(line), flush=True)
    return rows_out


def softmax_loss(h, w, b, y):
    import gradserve as gs

    return gs.cross_entropy(h @ w + b, y)


def non_matmul_seconds(plan: Any, feed: dict[str, Any]) -> float:
    """One run of `plan`, step by step: the seconds its steps other than matmuls took."""
    env: list[Any] = [None] * plan.n_slots
    for name, slot in plan.inputs:
        env[slot] = feed[name]
    for slot, c in plan.constants:
        env[slot] = c
    spent = 0.0
    with np.errstate(all="ignore"):
        for step in plan.steps:
            t0 = time.perf_counter()
            step.run(env)
            if isinstance(step, FusedStep) or step.unit.op != "matmul":
                spent += time.perf_counter() - t0
            for f in step.frees:
                env[f] = None
    return spent


def softmax_workload(args: argparse.Namespace) -> dict[str, Any]:
    import gradserve as gs
    from gradserve_engine import autodiff, fusion, native
    from gradserve_engine.ops import VIEWS
    from gradserve_engine.passes import optimize
    from gradserve_engine.plan import Plan

    n, d, c = args.sizes["softmax_shape"]
    rng = np.random.default_rng(mlpbench.SEED)
    feed = {"h": rng.standard_normal((n, d)).astype(np.float32),
            "w": (rng.standard_normal((d, c)) / np.sqrt(d)).astype(np.float32),
            "b": (0.01 * rng.standard_normal(c)).astype(np.float32), "y": rng.integers(0, c, n)}
    graph = optimize(autodiff.grad_only(gs.trace(softmax_loss, *feed.values()), ["w", "b"], "out", keep_outputs=True))
    variants = {"before": (("reduce_sum",), 0), "max/min epilogues": (fusion.EPILOGUE_OPS, 0),
                "+ recomputation (now)": (fusion.EPILOGUE_OPS, fusion.MAX_RECOMPUTED)}
    plans = {}
    saved = fusion.EPILOGUE_OPS, fusion.MAX_RECOMPUTED
    try:
        for name, (ops, most) in variants.items():
            fusion.EPILOGUE_OPS, fusion.MAX_RECOMPUTED = ops, most
            plans[name] = Plan(graph, kernels=native.NativeKernels())
    finally:
        fusion.EPILOGUE_OPS, fusion.MAX_RECOMPUTED = saved

    def passes(plan: Any) -> int:  # arrays of the logits' shape read or written by a step (views aside)
        return sum(sum(graph.aval(v)[1] == (n, c) for v in (*st.ins, *st.outs)) for st in plan.steps
                   if isinstance(st, FusedStep) or st.unit.op not in VIEWS)

    want = plans["before"].run(feed)
    got = {k: p.run(feed) for k, p in plans.items()}
    worst = max(float(np.max(np.abs(g[k] - want[k])) / max(float(np.max(np.abs(want[k]))), 1e-30))
                for g in got.values() for k in want)
    ok = worst <= 1e-5
    print(f"# softmax cross-entropy: logits {n}x{c} float32 (h {n}x{d}), gradients of w and b; results vs the "
          f"first plan, max relative |diff| {worst:.2g}" + (" OK" if ok else " MISMATCH"))
    for k, p in plans.items():
        print(f"#   {k}: {len(p.steps)} steps, {passes(p)} reads or writes of a {n}x{c} array")
    whole, _ = mlpbench.time_interleaved({k: (lambda p=p: p.run(feed)) for k, p in plans.items()}, args.repeat,
                                         args.block, args.settle, args.warmup)
    names = list(plans)
    other: dict[str, list[float]] = {k: [] for k in names}
    for r in range(args.repeat):  # the steps other than matmuls: the same turns, timed step by step
        for i in range(len(names)):
            k = names[(r + i) % len(names)]
            if args.settle > 0:
                time.sleep(args.settle)
            non_matmul_seconds(plans[k], feed)
            other[k] += [non_matmul_seconds(plans[k], feed) for _ in range(args.block)]
    out: dict[str, Any] = {"ok": ok, "max_rel_diff": worst, "steps": {k: len(p.steps) for k, p in plans.items()},
                           "passes": {k: passes(p) for k, p in plans.items()}}
    for label, samples in (("whole plan", whole), ("steps other than matmuls", other)):
        tm = {k: mlpbench.summarize(v, 1e3) for k, v in samples.items()}
        best = {k: min(v) * 1e3 for k, v in samples.items()}
        first, last = names[0], names[-1]
        print(f"# softmax cross-entropy, {label}: median [p25-p75] (best) ms: " + ", ".join(
            f"{k} {tm[k]['median']:.2f} [{tm[k]['p25']:.2f}-{tm[k]['p75']:.2f}] ({best[k]:.2f})" for k in names)
            + f"; {first} / {last}: median {tm[first]['median'] / tm[last]['median']:.2f}x, "
            f"best {best[first] / best[last]:.2f}x", flush=True)
        out[label] = {"time_ms": tm, "best_ms": best}
    return out


# ---------------------------------------------------------------- main


def table(results: dict[str, Any]) -> str:
    head = ["", "numpy kernels", "native kernels", "auto", "PyTorch", "numpy / native", "numpy / auto", "native / PyTorch",
            "numpy / PyTorch", "other processes, cores"]
    rows = [head, ["---"] + ["---:"] * (len(head) - 1)]
    for label, r in results["workloads"].items():
        m = {k: r["time_ms"][k]["median"] if k in r["time_ms"] else None for k in ("numpy", "native", "auto", "pytorch")}
        auto = m["auto"] if m["auto"] is not None else m["native"]
        load = r.get("foreign_load_cores")
        rows.append([f"{label}, median ms", *(mlpbench.fmt(m[k]) for k in ("numpy", "native", "auto", "pytorch")),
                     f"{m['numpy'] / m['native']:.2f}", f"{m['numpy'] / auto:.2f}", f"{m['native'] / m['pytorch']:.2f}",
                     f"{m['numpy'] / m['pytorch']:.2f}", "?" if load is None else f"{load:.2f}"])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=8, help="interleaved rounds (default 8)")
    ap.add_argument("--block", type=int, default=3, help="timed calls per contender per round (default 3)")
    ap.add_argument("--settle", type=float, default=0.25, help="sleep before each turn, s (default 0.25; see bench/mlp.py)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls of each contender first (default 2)")
    ap.add_argument("--dtype", default="float32,float64", help="MLP dtypes (default float32,float64)")
    ap.add_argument("--only", choices=("mlp", "chain", "threshold", "compile", "softmax"), action="append",
                    help="run only these parts (repeatable; default all)")
    ap.add_argument("--json", metavar="PATH", help="also write every number here")
    ap.add_argument("--smoke", action="store_true",
                    help=f"every part (or those of --only) with the same code at tiny sizes (MLP "
                         f"{mlpbench.shape_text(SMOKE['shape'])}, a {SMOKE['chain_blocks'] * 10}-op chain over "
                         f"{SMOKE['chain_shape']}, sweep up to "
                         f"{SMOKE['sweep_sizes'][-1]} elements), a few calls each: for the tests, the numbers mean nothing")
    if ap.parse_known_args(argv)[0].smoke:
        ap.set_defaults(repeat=2, block=2, settle=0.0, warmup=1)
    args = ap.parse_args(argv)
    args.sizes = SMOKE if args.smoke else FULL
    parts = set(args.only or ("mlp", "chain", "threshold", "compile", "softmax"))

    from gradserve_engine import native

    numba_mod, why = native.numba_status()
    if numba_mod is None:
        print(f"# native kernels unavailable: {why}", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    info = mlpbench.environment()
    info["numba"] = numba_mod.__version__
    info["numba_threads"] = native.NativeKernels().threads
    mlpbench.print_environment(info)
    print(f"# numba {numba_mod.__version__}; native pool threads {info['numba_threads']}; kernel cache "
          f"{native.kernel_cache_dir()}")
    if args.smoke:
        print("# smoke run: tiny sizes, a few calls each: checks that everything runs, the numbers mean nothing")
    results: dict[str, Any] = {"environment": info, "config": vars(args), "workloads": {}}

    if "compile" in parts:
        results["compile_seconds"] = compile_times(args)
    if "mlp" in parts:
        for dt in [d.strip() for d in args.dtype.split(",") if d.strip()]:
            results["workloads"][f"MLP fwd+bwd {dt}"] = mlp_workload(dt, args)
    if "chain" in parts:
        label = f"{args.sizes['chain_blocks'] * 10}-op elementwise chain fwd+bwd float32"
        results["workloads"][label] = chain_workload(args)
    if "threshold" in parts:
        results["threshold"] = threshold_sweep(args)
    if "softmax" in parts:
        results["softmax"] = softmax_workload(args)

    results["wall_s"] = time.perf_counter() - t_start
    if results["workloads"]:
        print()
        md = table(results)
        print(md)
        results["table_markdown"] = md
    print(f"\n# {results['wall_s']:.0f} s in all")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
            f.write("\n")
    bad = [k for k, r in results["workloads"].items() if not r["ok"]]
    if "softmax" in results and not results["softmax"]["ok"]:
        bad.append("softmax cross-entropy")
    if bad:
        print(f"# ERROR: gradients differ for {', '.join(bad)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
