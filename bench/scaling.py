"""Scaling over Ray workers: fan-out, data-parallel and graph-parallel against in-process.

    python bench/scaling.py --workers 1,2,4,8 [--json PATH]
    python bench/scaling.py --smoke      # 1 and 2 workers, tiny graphs, seconds after Ray starts (run by the tests)

Runs inside a loopback-only network namespace (it re-runs itself under `unshare -n` when it
is not in one: Ray probes outside addresses otherwise). For each worker count it builds a pool
of that many single-threaded Ray actors and measures, against the in-process engine (numpy
with every BLAS thread):
  - fan-out: --items (64) gradients of a medium MLP (batch 64, 256-512-512-10) as one batch_gradient;
  - data-parallel: one MLP step (batch 256, 784-1024-1024-10) sharded over the workers;
  - wide graph: the gradient of sum_i sum(tanh(A_i @ B_i)), --branches (64) of --size (512) squared,
    graph-parallel;
  - the seed's scalar gradient through the scheduler (which keeps it in process) vs the engine.
Prints speed-up over in-process and efficiency (speed-up over one worker / workers).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

FAN_MLP, DP_MLP = (64, (256, 512, 512, 10)), (256, (784, 1024, 1024, 10))  # (batch, layer sizes)
SMOKE_FAN_MLP, SMOKE_DP_MLP = (8, (16, 32, 32, 4)), (16, (24, 32, 32, 10))

def loopback_only() -> bool:
    with open("/proc/net/dev") as f:
        return [line.split(":")[0].strip() for line in f.readlines()[2:]] == ["lo"]


def median_seconds(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def mlp_loss(p, X, y):
    import gradserve as gs

    h = gs.tanh(X @ p["w1"] + p["b1"])
    h = gs.tanh(h @ p["w2"] + p["b2"])
    return gs.cross_entropy(h @ p["w3"] + p["b3"], y)


def mlp(batch: int, sizes: tuple[int, ...], rng) -> tuple:
    import gradserve as gs

    d0, d1, d2, d3 = sizes
    p = {"w1": rng.standard_normal((d0, d1)) * 0.03, "b1": np.zeros(d1), "w2": rng.standard_normal((d1, d2)) * 0.03,
         "b2": np.zeros(d2), "w3": rng.standard_normal((d2, d3)) * 0.03, "b3": np.zeros(d3)}
    X, y = rng.standard_normal((batch, d0)), rng.integers(0, d3, batch)
    graph = gs.trace(mlp_loss, p, X, y)
    inputs = {**{f"p.{k}": v for k, v in p.items()}, "X": X, "y": y}
    return graph, inputs, [f"p.{k}" for k in p]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", default="1,2,4,8", help="worker counts to measure")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--items", type=int, default=64, help="gradients in the fan-out batch")
    parser.add_argument("--branches", type=int, default=64)
    parser.add_argument("--size", type=int, default=512, help="side of the wide graph's matrices")
    parser.add_argument("--seed-calls", type=int, default=200, help="scalar gradients per timing of the seed's")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true",
                        help="1 and 2 workers, tiny MLPs, 8 fan-out items, 4 branches of 32x32, one timed call each: "
                             "the same code in seconds, for the tests (the numbers mean nothing)")
    if parser.parse_known_args(argv)[0].smoke:
        parser.set_defaults(workers="1,2", repeat=1, items=8, branches=4, size=32, seed_calls=10)
    args = parser.parse_args(argv)
    if not loopback_only():
        if os.geteuid() == 0 and shutil.which("unshare"):
            os.execvp("unshare", ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', sys.executable,
                                  *sys.argv])
        raise SystemExit("run inside a loopback-only namespace: unshare -n sh -c 'ip link set lo up && python bench/scaling.py'")
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    import ray

    import gradserve as gs
    from gradserve_engine.engine import Engine
    from gradserve_engine.pool import RayPool
    from gradserve_engine.scheduler import DistributedEngine, Policy

    counts = [int(k) for k in args.workers.split(",")]
    rng = np.random.default_rng(0)
    (fan_batch, fan_sizes), (dp_batch, dp_sizes) = (SMOKE_FAN_MLP, SMOKE_DP_MLP) if args.smoke else (FAN_MLP, DP_MLP)
    fan_graph, fan_inputs, fan_wrt = mlp(fan_batch, fan_sizes, rng)
    items = [({**fan_inputs, "X": fan_inputs["X"] + 0.01 * k}, None) for k in range(args.items)]
    dp_graph, dp_inputs, dp_wrt = mlp(dp_batch, dp_sizes, rng)
    branches = [(rng.standard_normal((args.size, args.size)) / args.size**0.5,
                 rng.standard_normal((args.size, args.size)) / args.size**0.5) for _ in range(args.branches)]
    wide_graph = gs.trace(lambda ab: sum(gs.sum(gs.tanh(a @ b)) for a, b in ab), branches)
    wide_inputs = {f"ab[{k}][{j}]": m for k, pair in enumerate(branches) for j, m in enumerate(pair)}
    seed_graph = gs.trace(lambda x, y: x * y + gs.sin(x), 2.0, 3.0)
    seed_inputs = {"x": np.float64(2.0), "y": np.float64(3.0)}

    local = Engine()
    t0 = time.perf_counter()
    base = {
        f"fan-out ({args.items} MLP gradients)": median_seconds(lambda: local.batch_vjp(fan_graph, items, fan_wrt), args.repeat),
        "data-parallel MLP step": median_seconds(lambda: local.vjp(dp_graph, dp_inputs, dp_wrt), args.repeat),
        f"wide graph ({args.branches} x {args.size}^2)": median_seconds(
            lambda: local.vjp(wide_graph, wide_inputs, list(wide_inputs)), max(args.repeat // 2, 1)),
    }
    n_seed = args.seed_calls
    seed_local = median_seconds(lambda: [local.vjp(seed_graph, seed_inputs, ["x", "y"]) for _ in range(n_seed)],
                                args.repeat) / n_seed
    ray.init(address="local", num_cpus=max(counts), include_dashboard=False, log_to_driver=False)
    rows: dict[str, dict[int, float]] = {k: {} for k in base}
    seed_sched = None
    for n in counts:
        pool = RayPool(n, cpus=1, blas_threads=1)
        engine = DistributedEngine(Engine(), pool, Policy(cluster_cores=n))
        runs = {
            f"fan-out ({args.items} MLP gradients)": lambda e=engine: e.batch_vjp(fan_graph, items, fan_wrt, mode="fan_out"),
            "data-parallel MLP step": lambda e=engine: e.vjp(dp_graph, dp_inputs, dp_wrt, batch_axes={"X": 0, "y": 0},
                                                             mode="data_parallel"),
            f"wide graph ({args.branches} x {args.size}^2)": lambda e=engine: e.vjp(
                wide_graph, wide_inputs, list(wide_inputs), mode="graph_parallel"),
        }
        for name, fn in runs.items():
            rows[name][n] = median_seconds(fn, max(args.repeat // (2 if "wide" in name else 1), 1))
        if seed_sched is None:
            seed_sched = median_seconds(lambda e=engine: [e.vjp(seed_graph, seed_inputs, ["x", "y"]) for _ in range(n_seed)],
                                        args.repeat) / n_seed
        pool.shutdown()
    ray.shutdown()

    if args.smoke:
        print("# smoke run: tiny graphs, one timed call each: checks that everything runs, the numbers mean nothing")
    print(f"# {os.cpu_count()} CPUs; in-process uses every BLAS thread, each worker one; medians of {args.repeat}")
    header = " | ".join(f"{n} workers" for n in counts)
    print(f"| workload | in-process s | {header} |\n|---|---:|" + "---:|" * len(counts))
    for name, per in rows.items():
        cells = []
        for n in counts:
            speed = base[name] / per[n]
            eff = (per[counts[0]] * counts[0] / per[n]) / n if counts[0] == 1 else float("nan")
            cells.append(f"{per[n]:.3f} s ({speed:.2f}x, eff {eff:.0%})")
        print(f"| {name} | {base[name]:.3f} | " + " | ".join(cells) + " |")
    print(f"\nseed scalar gradient: engine {seed_local * 1e6:.1f} us, through the scheduler with workers "
          f"{seed_sched * 1e6:.1f} us ({seed_sched / seed_local:.2f}x; it stays in process)")
    print(f"# {time.perf_counter() - t0:.0f} s in all")
    if args.json:
        args.json.write_text(json.dumps({"in_process": base, "workers": rows, "seed": [seed_local, seed_sched]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
