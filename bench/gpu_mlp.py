#!/usr/bin/env python
"""The MLP on a GPU: gradserve's CuPy kernels vs PyTorch CUDA, float32, one forward + backward.

    python bench/gpu_mlp.py                  # about a minute; needs cupy + a CUDA device (torch CUDA for the comparison)
    python bench/gpu_mlp.py --batch 4096 --repeat 10 --json out.json
    python bench/gpu_mlp.py --smoke          # batch 32, 2 rounds of 2 calls; without CuPy only the parts on the CPU

Batch 4096, 784 -> 1024 -> 1024 -> 10, tanh, softmax cross-entropy (mean), gradients of all six
weights and biases (bench/mlp.py's model at a GPU-sized batch). No network access is needed.

* gradserve: the gradient graph planned once with `GpuKernels(to_host=False)` (the kernel table
  over CuPy arrays, elementwise groups fused into `cupy.ElementwiseKernel`s); inputs uploaded
  once, each call `plan.run_values(device arrays)`, then a device synchronize.
* PyTorch: the same model on CUDA tensors, `torch.autograd.grad`, `torch.cuda.synchronize()`.
  TF32 is off in both (PyTorch's default for matmul; CuPy's unless CUPY_TF32=1).
* "with transfers": both again with the inputs coming from host numpy arrays and the gradients
  going back to host numpy arrays every call (gradserve: `GpuKernels()` with numpy in and out).

Gradients are checked against each other (and against gradserve's CPU numpy plan) before
timing. Contenders take turns round-robin (--repeat rounds of --block calls); medians are
printed, and the ratio gradserve / PyTorch. Exit status: 0 ok, 1 gradients differ, 2 CuPy or
a CUDA device is missing (the message says which).

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
        print("# PyTorch CUDA is missing: gradserve's numbers only, no ratio", flush=True)

    graph, feed = grad_graph(args.batch)
    params = {k: feed[f"params.{k}"] for k in NAMES}
    x, y = feed["x"], feed["y"]

    t0 = time.perf_counter()
    plan = Plan(graph, kernels=GpuKernels(to_host=False))
    build_s = time.perf_counter() - t0
    print(f"# gradserve GPU plan: {plan.kernel_info()}, built in {build_s:.2f} s (NVRTC compiles included)", flush=True)
    dev_values = [cp.asarray(feed[name]) for name, _ in plan.inputs]  # uploaded once

    def gs_step():
        out = plan.run_values(dev_values)
        cp.cuda.Stream.null.synchronize()
        return out

    host_plan = Plan(graph, kernels=GpuKernels(to_host=True))
    host_values = [feed[name] for name, _ in host_plan.inputs]

    def gs_step_transfers():
        return host_plan.run_values(host_values)  # numpy in (uploaded once per call), numpy out

    steps: dict[str, Any] = {"gradserve": gs_step}
    transfer_steps: dict[str, Any] = {"gradserve": gs_step_transfers}
    if have_torch:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        dev = torch.device("cuda")
        tp = [torch.tensor(params[k], device=dev, requires_grad=True) for k in NAMES]
        tx, ty = torch.tensor(x, device=dev), torch.tensor(y, device=dev)

        def torch_loss(ps, xx, yy):
            w1, b1, w2, b2, w3, b3 = ps
            h = torch.tanh(xx @ w1 + b1)
            h = torch.tanh(h @ w2 + b2)
            return torch.nn.functional.cross_entropy(h @ w3 + b3, yy)

        def torch_step():
            grads = torch.autograd.grad(torch_loss(tp, tx, ty), tp)
            torch.cuda.synchronize()
            return grads

        def torch_step_transfers():
            ps = [torch.from_numpy(params[k]).to(dev).requires_grad_(True) for k in NAMES]
            grads = torch.autograd.grad(torch_loss(ps, torch.from_numpy(x).to(dev), torch.from_numpy(y).to(dev)), ps)
            return [g.cpu().numpy() for g in grads]

        steps["pytorch"] = torch_step
        transfer_steps["pytorch"] = torch_step_transfers

    # gradients: gradserve GPU vs gradserve CPU (numpy) vs PyTorch CUDA
    got = {k: cp.asnumpy(v) for k, v in gs_step().items()}
    cpu = Plan(graph).run(feed)
    scale = {n: float(np.max(np.abs(cpu[GRAD + f"params.{n}"]))) for n in NAMES}
    diffs = {"gradserve GPU vs CPU": max(float(np.max(np.abs(got[GRAD + f"params.{n}"] - cpu[GRAD + f"params.{n}"]))) / scale[n]
                                         for n in NAMES)}
    if have_torch:
        tg = [g.detach().cpu().numpy() for g in torch_step()]
        diffs["gradserve GPU vs PyTorch CUDA"] = max(
            float(np.max(np.abs(got[GRAD + f"params.{n}"] - t))) / scale[n] for n, t in zip(NAMES, tg, strict=True))
    tol = 1e-3
    ok = all(v <= tol for v in diffs.values())
    print("# max |grad difference| / max |grad|: " + ", ".join(f"{k} {v:.2g}" for k, v in diffs.items())
          + (" OK" if ok else f" MISMATCH (tolerance {tol:g})"), flush=True)

    for fn in (*steps.values(), *transfer_steps.values()):  # warm-up: cuBLAS handles, allocator pools, kernels
        for _ in range(3):
            fn()
    results: dict[str, Any] = {"device": device, "batch": args.batch, "grad_check": diffs, "ok": ok, "plan_build_s": build_s,
                               "plan": plan.kernel_info()}
    for label, group in (("device-resident", steps), ("with transfers", transfer_steps)):
        rounds = args.repeat if label == "device-resident" else max(2, args.repeat // 3)
        samples = interleaved(group, rounds, args.block, deadline)
        med = {n: statistics.median(s) * 1e3 for n, s in samples.items() if s}
        results[label] = {n: {"median_ms": m, "n": len(samples[n])} for n, m in med.items()}
        line = f"# {label}: median ms: " + ", ".join(f"{n} {m:.3f}" for n, m in med.items())
        if "pytorch" in med and "gradserve" in med:
            line += f"; gradserve / PyTorch = {med['gradserve'] / med['pytorch']:.2f}"
            results[label]["ratio"] = med["gradserve"] / med["pytorch"]
        print(line, flush=True)
    results["wall_s"] = time.perf_counter() - t_start
    print(f"# {results['wall_s']:.0f} s in all")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
