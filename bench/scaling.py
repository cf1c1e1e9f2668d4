"""Scaling over Ray workers: fan-out, data-parallel and graph-parallel against in-process.

    python bench/scaling.py --workers 1,2,4,8 [--json PATH]
    python bench/scaling.py --smoke      # 1 and 2 workers, tiny graphs, seconds after Ray starts (run by the tests)
    python bench/scaling.py --no-netns   # on a machine with no outside network (or GRADSERVE_NO_NETNS=1)

Network: Ray probes outside addresses to find its own, so on a shared machine the script runs
inside a loopback-only network namespace: when it is not in one it re-runs itself under
`unshare -n` (needs root, `unshare` and `ip`). On a machine that has no outside network, or no
`ip` command, pass --no-netns (or set GRADSERVE_NO_NETNS=1) to run where it is.

For each worker count it builds a pool of that many single-threaded Ray actors and measures,
against the in-process engine (numpy with every BLAS thread):
  - fan-out: --items (64) gradients of a medium MLP (batch 64, 256-512-512-10) as one batch_gradient;
  - data-parallel: one MLP step (batch 256, 784-1024-1024-10) sharded over the workers;
  - wide graph: the gradient of sum_i sum(tanh(A_i @ B_i)), --branches (64) of --size (512) squared,
    graph-parallel;
  - the seed's scalar gradient through the scheduler (which keeps it in process) vs the engine.
Each mode forced, then "auto": the scheduler measuring its candidates and keeping the fastest
(the mode it kept is printed). The MLPs' parameters go with content ids, as the server's resident
tensors do (--no-content-ids: without), so after the first call they stay on the workers.
Prints speed-up over in-process and efficiency (speed-up over one worker / workers), the bytes
moved per call (driver -> workers / workers -> driver, in a steady call), and per-task overheads.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

FAN_MLP, DP_MLP = (64, (256, 512, 512, 10)), (256, (784, 1024, 1024, 10))  # (batch, layer sizes)
SMOKE_FAN_MLP, SMOKE_DP_MLP = (8, (16, 32, 32, 4)), (16, (24, 32, 32, 10))
NO_NETNS = "GRADSERVE_NO_NETNS"


def loopback_only() -> bool:
    with open("/proc/net/dev") as f:
        return [line.split(":")[0].strip() for line in f.readlines()[2:]] == ["lo"]


def netns_plan(no_netns: bool, env: Mapping[str, str], loopback: bool) -> str:
    """"run" here, "reexec" in a loopback-only namespace, or "refuse" (no way to make one)."""
    if no_netns or env.get(NO_NETNS, "") not in ("", "0") or loopback:
        return "run"
    if os.geteuid() == 0 and shutil.which("unshare") and shutil.which("ip"):
        return "reexec"
    return "refuse"


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


def megabytes(n: float) -> str:
    return f"{n / 1e6:.2f}"


def overheads(pool, graph, inputs: dict, calls: int) -> dict[str, float]:
    """Seconds per task of the pool: one scalar gradient task at a time, 64 in flight, and a put
    of 8 MB into the store (once; the same array again by content id costs a look-up)."""
    from gradserve_engine.pool import Task

    def one() -> None:
        pool.get([pool.submit(Task(graph, "vjp", inputs, {"wrt": ["x", "y"]}, 0))])

    def many() -> None:
        pool.get([pool.submit(Task(graph, "vjp", inputs, {"wrt": ["x", "y"]}, k % pool.size)) for k in range(64)])

    big = np.ones(1 << 20)
    return {"task round trip (scalar gradient)": median_seconds(one, calls),
            "task, 64 in flight (per task)": median_seconds(many, max(calls // 10, 1)) / 64,
            "put of 8 MB": median_seconds(lambda: pool.put(big), max(calls // 10, 1)),
            "put of 8 MB already in the store (content id)": median_seconds(lambda: pool.put(big, ("cid", "bench")), calls)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="1,2,4,8", help="worker counts to measure")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--items", type=int, default=64, help="gradients in the fan-out batch")
    parser.add_argument("--branches", type=int, default=64)
    parser.add_argument("--size", type=int, default=512, help="side of the wide graph's matrices")
    parser.add_argument("--seed-calls", type=int, default=200, help="scalar gradients per timing of the seed's")
    parser.add_argument("--no-content-ids", action="store_true",
                        help="pass the MLPs' parameters without content ids (sent again every call)")
    parser.add_argument("--no-netns", action="store_true",
                        help=f"run here, not in a loopback-only network namespace (also {NO_NETNS}=1): for machines "
                             "with no outside network, or without `ip`/`unshare`")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--smoke", action="store_true",
                        help="1 and 2 workers, tiny MLPs, 8 fan-out items, 4 branches of 32x32, one timed call each: "
                             "the same code in seconds, for the tests (the numbers mean nothing)")
    if parser.parse_known_args(argv)[0].smoke:
        parser.set_defaults(workers="1,2", repeat=1, items=8, branches=4, size=32, seed_calls=10)
    args = parser.parse_args(argv)
    plan = netns_plan(args.no_netns, os.environ, loopback_only())
    if plan == "reexec":
        os.execvp("unshare", ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"', sys.executable,
                              *sys.argv])
    if plan == "refuse":
        raise SystemExit("run inside a loopback-only namespace: unshare -n sh -c 'ip link set lo up && python "
                         f"bench/scaling.py'; or, on a machine with no outside network, pass --no-netns (or {NO_NETNS}=1)")
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
    fan_ids = None if args.no_content_ids else {n: f"fan/{n}@1" for n in fan_wrt}
    dp_ids = None if args.no_content_ids else {n: f"dp/{n}@1" for n in dp_wrt}
    branches = [(rng.standard_normal((args.size, args.size)) / args.size**0.5,
                 rng.standard_normal((args.size, args.size)) / args.size**0.5) for _ in range(args.branches)]
    wide_graph = gs.trace(lambda ab: sum(gs.sum(gs.tanh(a @ b)) for a, b in ab), branches)
    wide_inputs = {f"ab[{k}][{j}]": m for k, pair in enumerate(branches) for j, m in enumerate(pair)}
    seed_graph = gs.trace(lambda x, y: x * y + gs.sin(x), 2.0, 3.0)
    seed_inputs = {"x": np.float64(2.0), "y": np.float64(3.0)}
    fan_name, dp_name = f"fan-out ({args.items} MLP gradients)", "data-parallel MLP step"
    wide_name = f"wide graph ({args.branches} x {args.size}^2)"

    local = Engine()
    t0 = time.perf_counter()
    base = {
        fan_name: median_seconds(lambda: local.batch_vjp(fan_graph, items, fan_wrt), args.repeat),
        dp_name: median_seconds(lambda: local.vjp(dp_graph, dp_inputs, dp_wrt), args.repeat),
        wide_name: median_seconds(lambda: local.vjp(wide_graph, wide_inputs, list(wide_inputs)), max(args.repeat // 2, 1)),
    }
    n_seed = args.seed_calls
    seed_local = median_seconds(lambda: [local.vjp(seed_graph, seed_inputs, ["x", "y"]) for _ in range(n_seed)],
                                args.repeat) / n_seed
    ray.init(address="local", num_cpus=max(counts), include_dashboard=False, log_to_driver=False)
    rows: dict[str, dict[int, float]] = {k: {} for k in base}
    auto: dict[str, dict[int, tuple[float, str]]] = {k: {} for k in base}
    moved: dict[str, dict[int, tuple[int, int]]] = {k: {} for k in base}
    first_out: dict[str, dict[int, int]] = {k: {} for k in base}
    seed_sched = None
    per_task: dict[str, float] = {}
    for n in counts:
        pool = RayPool(n, cpus=1, blas_threads=1)
        engine = DistributedEngine(Engine(), pool, Policy(cluster_cores=n))
        runs = {
            fan_name: lambda e=engine, m="fan_out": e.batch_vjp(fan_graph, items, fan_wrt, mode=m, content_ids=fan_ids),
            dp_name: lambda e=engine, m="data_parallel": e.vjp(dp_graph, dp_inputs, dp_wrt, batch_axes={"X": 0, "y": 0},
                                                               mode=m, content_ids=dp_ids),
            wide_name: lambda e=engine, m="graph_parallel": e.vjp(wide_graph, wide_inputs, list(wide_inputs), mode=m),
        }
        for name, fn in runs.items():
            before = dict(engine.bytes_moved)
            fn()  # the first call: what goes to the workers once
            first_out[name][n] = engine.bytes_moved["driver_workers", "out"] - before["driver_workers", "out"]
            rows[name][n] = median_seconds(fn, max(args.repeat // (2 if "wide" in name else 1), 1))
            before = dict(engine.bytes_moved)
            fn()  # a steady call
            moved[name][n] = (engine.bytes_moved["driver_workers", "out"] - before["driver_workers", "out"],
                              engine.bytes_moved["driver_workers", "in"] - before["driver_workers", "in"])
        for name, fn in runs.items():  # the scheduler's own choice: measure until it decided, then time
            chooser = DistributedEngine(Engine(), pool, Policy(cluster_cores=n))
            for _ in range(12):
                fn(chooser, None)
                if all(t["decided"] for t in chooser.timings()):
                    break
            decided = chooser.timings()
            kept = decided[0]["chosen"] if decided else "in_process, nothing else tried"
            repeat = max(args.repeat // (2 if "wide" in name else 1), 1)
            auto[name][n] = (median_seconds(lambda c=chooser, f=fn: f(c, None), repeat), kept)
            if decided:
                print(f"# auto, {n} workers: {chooser.schedule_info()}", flush=True)
        if seed_sched is None:
            seed_sched = median_seconds(lambda e=engine: [e.vjp(seed_graph, seed_inputs, ["x", "y"]) for _ in range(n_seed)],
                                        args.repeat) / n_seed
        if n == max(counts):
            per_task = overheads(pool, seed_graph, seed_inputs, 5 if args.smoke else 100)
        pool.shutdown()
    ray.shutdown()

    if args.smoke:
        print("# smoke run: tiny graphs, one timed call each: checks that everything runs, the numbers mean nothing")
    print(f"# {os.cpu_count()} CPUs; in-process uses every BLAS thread, each worker one; medians of {args.repeat}; "
          f"parameters {'without' if args.no_content_ids else 'with'} content ids")
    header = " | ".join(f"{n} workers" for n in counts)
    print(f"| workload | in-process s | {header} |\n|---|---:|" + "---:|" * len(counts))
    for name, per in rows.items():
        cells = []
        for n in counts:
            speed = base[name] / per[n]
            eff = (per[counts[0]] * counts[0] / per[n]) / n if counts[0] == 1 else float("nan")
            cells.append(f"{per[n]:.3f} s ({speed:.2f}x, eff {eff:.0%})")
        print(f"| {name} | {base[name]:.3f} | " + " | ".join(cells) + " |")
    print(f"\n| auto (the scheduler's choice) | in-process s | {header} |\n|---|---:|" + "---:|" * len(counts))
    for name, per_auto in auto.items():
        cells = [f"{per_auto[n][0]:.3f} s ({base[name] / per_auto[n][0]:.2f}x, {per_auto[n][1]})" for n in counts]
        print(f"| {name} | {base[name]:.3f} | " + " | ".join(cells) + " |")
    print(f"\n| bytes moved per call, MB: driver->workers / workers->driver (first call's out) | {header} |\n|---|"
          + "---:|" * len(counts))
    for name, per_moved in moved.items():
        cells = [f"{megabytes(per_moved[n][0])} / {megabytes(per_moved[n][1])} ({megabytes(first_out[name][n])})"
                 for n in counts]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\n| per-task overhead, {max(counts)} workers | µs |\n|---|---:|")
    for name, seconds in per_task.items():
        print(f"| {name} | {seconds * 1e6:.0f} |")
    print(f"\nseed scalar gradient: engine {seed_local * 1e6:.1f} us, through the scheduler with workers "
          f"{seed_sched * 1e6:.1f} us ({seed_sched / seed_local:.2f}x; it stays in process)")
    print(f"# {time.perf_counter() - t0:.0f} s in all")
    if args.json:
        args.json.write_text(json.dumps({"in_process": base, "workers": rows, "auto": auto, "bytes_moved": moved,
                                         "first_call_out": first_out, "per_task": per_task,
                                         "seed": [seed_local, seed_sched]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
