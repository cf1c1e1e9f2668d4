#!/usr/bin/env python
"""The MLP on a GPU: gradserve's CuPy kernels, step by step and replayed from CUDA graphs, vs
PyTorch CUDA, eager and replayed from a CUDA graph; float32, one forward + backward.

    python bench/gpu_mlp.py                  # about a minute; needs cupy + a CUDA device (torch CUDA for the comparison)
    python bench/gpu_mlp.py --batch 4096 --repeat 10 --json out.json
    python bench/gpu_mlp.py --smoke          # batch 32, 2 rounds of 2 calls; without CuPy only the parts on the CPU

Batch 4096, 784 -> 1024 -> 1024 -> 10, tanh, softmax cross-entropy (mean), gradients of all six
weights and biases (bench/mlp.py's model at a GPU-sized batch). No network access is needed.

Contenders (each timed call ends with a device synchronize):
* gradserve eager: the gradient graph planned once with `GpuKernels(to_host=False, graphs=False)`
  (the kernel table over CuPy arrays, elementwise groups fused into `cupy.ElementwiseKernel`s),
  each call `plan.run_values(device arrays)`: every kernel launched from Python.
* gradserve graphs: the same with `GpuKernels(to_host=False)`: from the second call on, the
  inputs copied into static buffers and the plan's CUDA graphs launched, the matmuls (cuBLAS,
  which CuPy refuses to capture) between them; the results copied out of the static buffers.
* PyTorch eager: the same model on CUDA tensors, `torch.autograd.grad`.
* PyTorch graphs: that call captured once with `torch.cuda.graph` over static inputs and
  replayed (`CUDAGraph.replay`), gradients read from its static outputs.
TF32 is off everywhere (PyTorch's default for matmul; CuPy's unless CUPY_TF32=1).

"device-resident": inputs already on the device, gradients left there. "with transfers": every
call takes numpy arrays from the host and brings the gradients back as numpy arrays (gradserve:
`GpuKernels()` / `GpuKernels(graphs=False)`, numpy in and out; PyTorch: `.to(device)` and
`.cpu()`, into and out of the graph's static tensors for its graph).

Before timing, every contender's gradients, device-resident and with transfers (each run three
times first, so that the replayed ones have recorded), are checked against gradserve's CPU numpy
plan, and gradserve's also against PyTorch eager's. Contenders take turns round-robin (--repeat rounds of --block calls);
medians are printed with the ratios, and a table at the end. Exit status: 0 ok, 1 gradients
differ, 2 CuPy or a CUDA device is missing (the message says which).

--smoke (for the tests): batch 32 and a few calls, the same code. Without CuPy or a device it
runs what needs neither (the gradient graph, the CPU plan that is the reference, the CUDA
source of every group the GPU plan would fuse), says what it skipped and exits 0.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
D_IN, D_H, D_OUT = 784, 1024, 10
NAMES = ("w1", "b1", "w2", "b2", "w3", "b3")


def import_gradserve() -> Any:
    """gradserve installed, or else straight from this checkout (each top folder holds a package)."""
    try:
        import gradserve
    except ImportError:
        sys.path[:0] = [str(ROOT / folder) for folder in ("client", "workers")]
        import gradserve
    return gradserve


def problem(batch: int, seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)

    def glorot(n_in: int, n_out: int) -> np.ndarray:
        lim = np.sqrt(6.0 / (n_in + n_out))
        return rng.uniform(-lim, lim, size=(n_in, n_out)).astype(np.float32)

    params = {"w1": glorot(D_IN, D_H), "b1": (0.01 * rng.standard_normal(D_H)).astype(np.float32),
              "w2": glorot(D_H, D_H), "b2": (0.01 * rng.standard_normal(D_H)).astype(np.float32),
              "w3": glorot(D_H, D_OUT), "b3": (0.01 * rng.standard_normal(D_OUT)).astype(np.float32)}
    return params, rng.standard_normal((batch, D_IN)).astype(np.float32), rng.integers(0, D_OUT, batch)


def loss_fn(params, x, y):
    import gradserve as gs

    h = gs.tanh(x @ params["w1"] + params["b1"])
    h = gs.tanh(h @ params["w2"] + params["b2"])
    return gs.cross_entropy(h @ params["w3"] + params["b3"], y)


def interleaved(steps: dict[str, Any], rounds: int, block: int, deadline: float) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {n: [] for n in steps}
    names = list(steps)
    for r in range(rounds):
        if time.perf_counter() > deadline:
            print(f"# time budget reached after {r} rounds", flush=True)
            break
        for i in range(len(names)):
            n = names[(r + i) % len(names)]
            steps[n]()  # one untimed call per turn
            for _ in range(block):
                t0 = time.perf_counter()
                steps[n]()
                samples[n].append(time.perf_counter() - t0)
    return samples


def find_device() -> tuple[Any, str, int]:
    """(cupy, the device's name, devices visible), or (None, why not, 0)."""
    try:
        import cupy as cp
    except Exception as e:
        return None, f"CuPy is not importable ({type(e).__name__}: {e}); install cupy-cuda12x", 0
    try:
        n_dev = cp.cuda.runtime.getDeviceCount()
        props = cp.cuda.runtime.getDeviceProperties(0)
    except Exception as e:
        return None, f"CuPy finds no CUDA device ({type(e).__name__}: {e})", 0
    return cp, props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"]), n_dev


def grad_graph(batch: int) -> tuple[Any, dict[str, np.ndarray]]:
    """The optimised gradient graph of the MLP (gradients of the six parameters, loss kept) and its feed."""
    gs = import_gradserve()
    from gradserve_engine import autodiff
    from gradserve_engine.passes import optimize

    params, x, y = problem(batch)
    traced = gs.trace(loss_fn, params, x, y)
    wrt = [f"params.{k}" for k in NAMES]
    graph = optimize(autodiff.grad_only(traced, wrt, "out", keep_outputs=True))
    return graph, {"x": x, "y": y, **{f"params.{k}": v for k, v in params.items()}}


def cpu_smoke(batch: int, why: str) -> int:
    """--smoke without a GPU: what runs without CuPy, then what was skipped."""
    from gradserve_engine.fusion import find_groups
    from gradserve_engine.gpu import elementwise_source
    from gradserve_engine.names import GRAD
    from gradserve_engine.plan import Plan

    graph, feed = grad_graph(batch)
    cpu = Plan(graph).run(feed)
    ok = all(np.all(np.isfinite(cpu[GRAD + f"params.{n}"])) for n in NAMES)
    groups = find_groups(graph)  # what GpuKernels(fuse=True) compiles: it accepts every elementwise op
    sources = [elementwise_source(g) for g in groups]
    print(f"# gradient graph: {len(graph.nodes)} nodes; CPU plan (the reference) ran, gradients "
          f"{'finite' if ok else 'NOT FINITE'}; CUDA source of {len(sources)} fused groups "
          f"({sum(len(body.splitlines()) for _, _, body in sources)} lines) generated", flush=True)
    print(f"# skipped, no GPU here ({why}): the GPU plans, their gradient check and the timing", flush=True)
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=10, help="interleaved rounds (default 10)")
    ap.add_argument("--block", type=int, default=10, help="timed calls per contender per round (default 10)")
    ap.add_argument("--budget", type=float, default=100.0, help="stop timing after this many seconds in all (default 100)")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--smoke", action="store_true",
                    help="batch 32, 2 rounds of 2 calls: the same code in seconds, for the tests; without CuPy or a "
                         "device, only the parts that need neither (exit 0)")
    if ap.parse_known_args(argv)[0].smoke:
        ap.set_defaults(batch=32, repeat=2, block=2, budget=20.0)
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    deadline = t_start + args.budget

    cp, device, n_dev = find_device()
    if args.smoke:
        print(f"# smoke run: batch {args.batch}, {args.repeat} rounds of {args.block} calls: checks that everything "
              "runs, the numbers mean nothing", flush=True)
    if cp is None:
        if args.smoke:
            return cpu_smoke(args.batch, device)
        print(f"error: {device}", file=sys.stderr)
        return 2
    try:
        import torch

        have_torch = torch.cuda.is_available()
        torch_note = f"torch {torch.__version__}, CUDA {'available' if have_torch else 'NOT available'}"
    except Exception as e:
        have_torch, torch_note = False, f"torch not importable ({type(e).__name__}: {e})"
    from gradserve_engine.gpu import GpuKernels
    from gradserve_engine.names import GRAD
    from gradserve_engine.plan import Plan

    print(f"# device: {device} ({n_dev} visible); cupy {cp.__version__}; {torch_note}; numpy {np.__version__}", flush=True)
    if not have_torch:
        print("# PyTorch CUDA is missing: gradserve's numbers only, no ratio to PyTorch", flush=True)

    graph, feed = grad_graph(args.batch)
    params = {k: feed[f"params.{k}"] for k in NAMES}
    x, y = feed["x"], feed["y"]
    sync = cp.cuda.runtime.deviceSynchronize

    t0 = time.perf_counter()
    first = Plan(graph, kernels=GpuKernels(to_host=False, graphs=False))
    build_s = time.perf_counter() - t0
    plans = {"gradserve eager": first, "gradserve graphs": Plan(graph, kernels=GpuKernels(to_host=False))}
    host_plans = {"gradserve eager": Plan(graph, kernels=GpuKernels(graphs=False)),
                  "gradserve graphs": Plan(graph, kernels=GpuKernels())}
    print(f"# gradserve GPU plan: {plans['gradserve eager'].kernel_info()}, built in {build_s:.2f} s (NVRTC compiles "
          "included)", flush=True)
    dev_values = [cp.asarray(feed[name]) for name, _ in plans["gradserve eager"].inputs]  # uploaded once
    host_values = [feed[name] for name, _ in plans["gradserve eager"].inputs]

    def resident(plan: Any) -> Any:
        def step() -> Any:
            out = plan.run_values(dev_values)
            sync()
            return out

        return step

    def transfers(plan: Any) -> Any:
        return lambda: plan.run_values(host_values)  # numpy in (uploaded every call), numpy out

    steps: dict[str, Any] = {name: resident(plan) for name, plan in plans.items()}
    transfer_steps: dict[str, Any] = {name: transfers(plan) for name, plan in host_plans.items()}
    torch_grads: list[np.ndarray] | None = None
    if have_torch:
        torch_grads = add_torch(torch, params, x, y, steps, transfer_steps)

    # gradients: every contender, device-resident and with transfers, the replayed ones after they recorded, vs
    # gradserve's CPU plan; gradserve's also vs PyTorch eager's
    cpu = Plan(graph).run(feed)
    scale = {n: float(np.max(np.abs(cpu[GRAD + f"params.{n}"]))) for n in NAMES}

    def worst(got: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> float:
        return max(float(np.max(np.abs(got[n] - ref[n]))) / scale[n] for n in NAMES)

    def gradients(out: Any) -> dict[str, np.ndarray]:
        """A contender's gradients as numpy: gradserve's results by name, PyTorch's six in order."""
        if isinstance(out, dict):
            return {n: cp.asnumpy(out[GRAD + f"params.{n}"]) for n in NAMES}
        return {n: g if isinstance(g, np.ndarray) else g.detach().cpu().numpy() for n, g in zip(NAMES, out, strict=True)}

    ref = {n: cpu[GRAD + f"params.{n}"] for n in NAMES}
    diffs: dict[str, float] = {}
    for label, group in (("", steps), (" with transfers", transfer_steps)):
        for name, step in group.items():
            for _ in range(3):  # step by step, recorded, replayed
                out = step()
            got = gradients(out)
            diffs[f"{name}{label} vs CPU"] = worst(got, ref)
            if torch_grads is not None and name in plans:
                diffs[f"{name}{label} vs PyTorch CUDA"] = worst(got, dict(zip(NAMES, torch_grads, strict=True)))
    tol = 1e-3
    ok = all(v <= tol for v in diffs.values())
    print("# gradserve GPU vs CPU, max |grad difference| / max |grad|: " + ", ".join(f"{k} {v:.2g}" for k, v in diffs.items())
          + (" OK" if ok else f" MISMATCH (tolerance {tol:g})"), flush=True)
    for label, plan in (("", plans["gradserve graphs"]), (" (with transfers)", host_plans["gradserve graphs"])):
        info = plan.kernel_info()
        print(f"# gradserve CUDA graphs{label}: {info['cuda_graph']}; {info['cuda_graph_bytes'] / 2**20:.1f} MiB held",
              flush=True)

    for fn in (*steps.values(), *transfer_steps.values()):  # warm-up: cuBLAS handles, allocator pools, kernels
        for _ in range(3):
            fn()
    results: dict[str, Any] = {"device": device, "batch": args.batch, "grad_check": diffs, "ok": ok, "plan_build_s": build_s,
                               "plans": {name: plan.kernel_info() for name, plan in plans.items()}}
    table: list[tuple[str, dict[str, float]]] = []
    for label, group in (("device-resident", steps), ("with transfers", transfer_steps)):
        rounds = args.repeat if label == "device-resident" else max(2, args.repeat // 3)
        samples = interleaved(group, rounds, args.block, deadline)
        med = {n: statistics.median(s) * 1e3 for n, s in samples.items() if s}
        results[label] = {n: {"median_ms": m, "n": len(samples[n])} for n, m in med.items()}
        ratios = {f"{a} / {b}": med[a] / med[b] for a, b in (("gradserve graphs", "gradserve eager"),
                                                              ("gradserve graphs", "pytorch eager"),
                                                              ("gradserve graphs", "pytorch graphs"),
                                                              ("pytorch graphs", "pytorch eager")) if a in med and b in med}
        results[label + " ratios"] = ratios
        print(f"# {label}: median ms: " + ", ".join(f"{n} {m:.3f}" for n, m in med.items())
              + "".join(f"; {k} = {v:.2f}" for k, v in ratios.items()), flush=True)
        table.append((label, med))
    names = [n for n in ("gradserve eager", "gradserve graphs", "pytorch eager", "pytorch graphs") if n in table[0][1]]
    print(f"\n| batch {args.batch}, float32, median ms | " + " | ".join(names) + " |")
    print("|---|" + "--:|" * len(names))
    for label, med in table:
        print(f"| {label} | " + " | ".join(f"{med[n]:.3f}" if n in med else "-" for n in names) + " |")
    results["wall_s"] = time.perf_counter() - t_start
    print(f"# {results['wall_s']:.0f} s in all")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0 if ok else 1


def add_torch(torch: Any, params: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray, steps: dict[str, Any],
              transfer_steps: dict[str, Any]) -> list[np.ndarray]:
    """PyTorch's contenders added to `steps` (device-resident) and `transfer_steps`: eager, and
    (when capture works) one call captured with `torch.cuda.graph` and replayed. Returns
    PyTorch's gradients (numpy), from an eager call."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda")
    tp = [torch.tensor(params[k], device=dev, requires_grad=True) for k in NAMES]
    tx, ty = torch.tensor(x, device=dev), torch.tensor(y, device=dev)

    def torch_loss(ps: Any, xx: Any, yy: Any) -> Any:
        w1, b1, w2, b2, w3, b3 = ps
        h = torch.tanh(xx @ w1 + b1)
        h = torch.tanh(h @ w2 + b2)
        return torch.nn.functional.cross_entropy(h @ w3 + b3, yy)

    def torch_step() -> Any:
        grads = torch.autograd.grad(torch_loss(tp, tx, ty), tp)
        torch.cuda.synchronize()
        return grads

    def torch_step_transfers() -> Any:
        ps = [torch.from_numpy(params[k]).to(dev).requires_grad_(True) for k in NAMES]
        grads = torch.autograd.grad(torch_loss(ps, torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev)), ps)
        return [g.cpu().numpy() for g in grads]

    steps["pytorch eager"] = torch_step
    transfer_steps["pytorch eager"] = torch_step_transfers
    try:  # PyTorch's recipe: warm up on a side stream, then capture
        static_x, static_y = tx.clone(), ty.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                torch.autograd.grad(torch_loss(tp, static_x, static_y), tp)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_grads = torch.autograd.grad(torch_loss(tp, static_x, static_y), tp)
    except Exception as e:
        print(f"# PyTorch CUDA graph: capture failed ({type(e).__name__}: {e}); PyTorch eager only", flush=True)
    else:
        def graph_step() -> Any:
            graph.replay()
            torch.cuda.synchronize()
            return static_grads

        def graph_step_transfers() -> Any:
            with torch.no_grad():
                for p, k in zip(tp, NAMES, strict=True):
                    p.copy_(torch.from_numpy(params[k]))
                static_x.copy_(torch.from_numpy(x))
                static_y.copy_(torch.from_numpy(y))
            graph.replay()
            return [g.cpu().numpy() for g in static_grads]

        steps["pytorch graphs"] = graph_step
        transfer_steps["pytorch graphs"] = graph_step_transfers
    return [g.detach().cpu().numpy() for g in torch_step()]


if __name__ == "__main__":
    sys.exit(main())
